"""Test driver: train several configs one after another inside one torchrun launch, so the
2-rank family runs pay the interpreter and import start-up once. Each config's summary goes
to `summary.json` beside it.

Each run needs a fresh rendezvous store: a new process group on the store of the one just
destroyed could read its stale gloo addresses. The ports come from the operating system, never
from arithmetic on MASTER_PORT (a port nobody reserved, which another test may hold): before
each run rank 0 starts a multi-tenant TCPStore on port 0, keeps it open for the run (its
`init_process_group` joins that same server) and publishes the port it got on torchrun's own
agent store, where the other ranks wait for it."""

from __future__ import annotations

import logging
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch.distributed as dist
from flywheel_trainer.config import TrainerConfig
from flywheel_trainer.train import run

TIMEOUT = timedelta(minutes=5)


def fresh_store(agent: dist.TCPStore, rank: int, world: int, key: str) -> dist.TCPStore | None:
    """Rank 0: a new store server on a port the OS chose, published under `key`; the others:
    that port, read from the agent store. MASTER_PORT points at it afterwards."""
    host = os.environ["MASTER_ADDR"]
    server = None
    if rank == 0:
        server = dist.TCPStore(host, 0, world, is_master=True, multi_tenant=True,
                               wait_for_workers=False, timeout=TIMEOUT)
        agent.set(key, str(server.port))
    os.environ["MASTER_PORT"] = agent.get(key).decode()
    return server


if __name__ == "__main__":
    rank = int(os.environ.get("RANK", "0"))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"%(asctime)s [rank{rank}] %(name)s %(levelname)s %(message)s")
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        sys.exit("train_many.py shares ports through torchrun's agent store: run it under "
                 "torchrun --standalone (or a c10d rendezvous)")
    # the agent's store: torchrun hosts it for the whole launch; only used to share ports
    agent = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]),
                          is_master=False, wait_for_workers=False, timeout=TIMEOUT)
    os.environ.pop("TORCHELASTIC_USE_AGENT_STORE", None)  # rank 0 hosts each run's store
    for i, path in enumerate(sys.argv[1:]):
        server = fresh_store(agent, rank, world, f"flywheel/train_many/{i}/port")
        os.environ["FLYWHEEL_SUMMARY_PATH"] = str(Path(path).with_name("summary.json"))
        logging.getLogger("flywheel.test").info("training %s on store port %s", path,
                                                os.environ["MASTER_PORT"])
        run(TrainerConfig.load(path))
        del server  # this run's store goes with its process group
