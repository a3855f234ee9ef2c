"""`torchrun ... -m flywheel_trainer --config CONFIG.json [--preflight [--output PATH]
[--world-size N] [--device-memory-gb GB] [--show-examples N]]`.

Exit codes: 0 done, 2 data or configuration error (no retry helps; see launch.py), else 1."""

from __future__ import annotations

import argparse
import logging
import os
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="flywheel_trainer")
    parser.add_argument("--config", required=True, help="TrainerConfig JSON")
    parser.add_argument("--preflight", action="store_true",
                        help="validate data and plan the run (CPU only, no weights), then exit")
    parser.add_argument("--output", default=None,
                        help="preflight: also write the JSON result here (default: "
                             "$FLYWHEEL_SUMMARY_PATH when set)")
    parser.add_argument("--world-size", type=int, default=None,
                        help="preflight: ranks to plan optimizer steps for (default $WORLD_SIZE)")
    parser.add_argument("--device-memory-gb", type=float, default=None,
                        help="preflight: memory of one GPU in GB; refuse runs that cannot fit "
                             "(default: deviceMemoryGB from the config)")
    parser.add_argument("--show-examples", type=int, default=0, metavar="N",
                        help="preflight: print the first N conversations as rendered, with the "
                             "loss spans in « »")
    args = parser.parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format=f"%(asctime)s [rank{rank}] %(name)s %(levelname)s %(message)s",
        stream=sys.stderr,
    )
    from pydantic import ValidationError

    from .config import TrainerConfig
    from .contract import EXIT_DATA_ERROR
    from .data import DataError
    from .fetch import DigestMismatch

    try:
        cfg = TrainerConfig.load(args.config)
    except (OSError, ValueError, ValidationError) as err:  # the same config fails again
        if rank == 0 and not args.preflight:
            from .tracking import write_summary

            write_summary({"error": f"ConfigError: {args.config}: {err}"})
        logging.getLogger("flywheel").error("config %s: %s", args.config, err)
        return EXIT_DATA_ERROR
    if args.device_memory_gb:
        cfg.deviceMemoryGB = args.device_memory_gb
    if args.preflight:
        from .preflight import preflight

        return preflight(cfg, args.output, args.world_size, args.show_examples)
    from .train import run

    try:
        run(cfg, exiting=True)
    except (DataError, DigestMismatch) as err:  # rank 0 wrote the summary; the same data
        # (or a base model whose bytes are not the registered ones) fails again
        logging.getLogger("flywheel").error("%s", err)
        return EXIT_DATA_ERROR
    # Done, the summary written: leave without the interpreter's and the process group's
    # teardown (train.run), which can only turn a complete attempt into a failed one.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
