"""The operator under tracemalloc, to see where its memory goes.

    FLYWHEEL_HEAP_OUT=.cache/heap.txt python bench/heap.py --standalone --all-namespaces ...

Runs `python -m flywheel_operator` with the given arguments, tracing every allocation
(`FLYWHEEL_HEAP_FRAMES` frames deep, default 8). SIGUSR2 appends a report to
$FLYWHEEL_HEAP_OUT: the live bytes by file, then the largest allocation sites with their
callers. `bench/operator_scale.py --training --heap` sends it at the end of its window.
Tracing costs CPU and memory of its own: use it to find where, not to measure how much.
"""

from __future__ import annotations

import gc
import os
import signal
import sys
import time
import tracemalloc

OUT = os.environ.get("FLYWHEEL_HEAP_OUT", "heap.txt")


def report(*_) -> None:
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    total = sum(s.size for s in snapshot.statistics("filename"))
    lines = [f"=== {time.strftime('%H:%M:%S')}: {total / 2**20:.1f} MiB traced "
             f"(RSS is more: the interpreter, libraries, freed pages kept)"]
    lines += ["--- by file"]
    lines += [f"{s.size / 2**20:8.2f} MiB {s.count:9d} blocks  {s.traceback[0].filename}"
              for s in snapshot.statistics("filename")[:25]]
    lines += ["--- by allocation site, with callers"]
    for stat in snapshot.statistics("traceback")[:30]:
        lines.append(f"{stat.size / 2**20:8.2f} MiB {stat.count:9d} blocks")
        lines += [f"      {f.filename}:{f.lineno}" for f in stat.traceback[:8]]
    with open(OUT, "a") as out:
        out.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    tracemalloc.start(int(os.environ.get("FLYWHEEL_HEAP_FRAMES", "8")))
    signal.signal(signal.SIGUSR2, report)
    from flywheel_operator.__main__ import main

    sys.argv = ["flywheel-operator", *sys.argv[1:]]
    sys.exit(main())
