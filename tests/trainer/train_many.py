"""Test driver: train several configs one after another inside one torchrun launch, so the
2-rank family runs pay the interpreter and import start-up once. Each config's summary goes
to `summary.json` beside it. Each run gets a fresh rendezvous store on its own port: a new
process group on the store of the one just destroyed could read its stale gloo addresses."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from flywheel_trainer.config import TrainerConfig
from flywheel_trainer.train import run

if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s %(levelname)s %(message)s")
    base_port = int(os.environ["MASTER_PORT"])
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)
    for i, path in enumerate(sys.argv[1:]):
        os.environ["MASTER_PORT"] = str(base_port + 1 + i)
        os.environ["FLYWHEEL_SUMMARY_PATH"] = str(Path(path).with_name("summary.json"))
        logging.getLogger("flywheel.test").info("training %s", path)
        run(TrainerConfig.load(path))
