"""`python -m flywheel_trainer.launch TORCHRUN_ARGS...`: torchrun that keeps the trainer's
exit-code contract at the pod level.

torchrun exits 1 whatever its workers exited with. The operator (and a Job's
podFailurePolicy) read the pod's exit code, so this launcher passes the contract through:

    0  success
    2  data or configuration error (`EXIT_DATA_ERROR`): the same input fails again, so the
       run fails at once, no retry; the termination message carries the trainer's words
    1  anything else (retried from the last complete checkpoint, up to spec.maxRestarts)
"""

from __future__ import annotations

import sys

from .contract import EXIT_DATA_ERROR


def main(argv: list[str] | None = None) -> int:
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun

    try:
        torchrun(argv)
    except ChildFailedError as err:
        codes = {f.exitcode for f in err.failures.values()}
        return EXIT_DATA_ERROR if EXIT_DATA_ERROR in codes else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
