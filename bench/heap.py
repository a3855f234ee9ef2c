"""The operator under tracemalloc, to see where its memory goes.

    FLYWHEEL_HEAP_OUT=.cache/heap.txt python bench/heap.py --standalone --all-namespaces ...

Runs `python -m flywheel_operator` with the given arguments, tracing every allocation
(`FLYWHEEL_HEAP_FRAMES` frames deep, default 8; 0 traces nothing). SIGUSR2 appends a report
to $FLYWHEEL_HEAP_OUT: glibc's own account of the heap (mallinfo2: bytes in use, bytes free
but kept, mmap'd blocks), the live objects by type, then, when tracing, the live bytes by
file and the largest allocation sites with their callers. `bench/operator_scale.py --training
--heap` sends it at the end of its window. Tracing costs CPU and memory of its own: use it to
find where, not to measure how much.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import os
import signal
import sys
import time
import tracemalloc

OUT = os.environ.get("FLYWHEEL_HEAP_OUT", "heap.txt")


class _MallInfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
        "fordblks", "keepcost")]


def malloc_lines() -> list[str]:
    """glibc's heap: what is allocated, what is free but kept (fragmentation), mmap'd."""
    libc = ctypes.CDLL("libc.so.6")
    libc.mallinfo2.restype = _MallInfo2
    m = libc.mallinfo2()
    mib = 2**20
    objects = collections.Counter(type(o).__name__ for o in gc.get_objects())
    return [f"--- glibc malloc: {m.uordblks / mib:.1f} MiB in use, {m.fordblks / mib:.1f} MiB "
            f"free in its arenas ({m.arena / mib:.1f} MiB arenas, {m.hblkhd / mib:.1f} MiB in "
            f"{m.hblks} mmap'd blocks); threads {len(os.listdir('/proc/self/task'))}",
            "--- objects the collector tracks, by type: " + ", ".join(
                f"{name} {count}" for name, count in objects.most_common(15))]


def report(*_) -> None:
    gc.collect()
    if not tracemalloc.is_tracing():
        with open(OUT, "a") as out:
            out.write("\n".join([f"=== {time.strftime('%H:%M:%S')}", *malloc_lines()]) + "\n")
        return
    snapshot = tracemalloc.take_snapshot().filter_traces(
        [tracemalloc.Filter(False, tracemalloc.__file__)])
    total = sum(s.size for s in snapshot.statistics("filename"))
    lines = [f"=== {time.strftime('%H:%M:%S')}: {total / 2**20:.1f} MiB traced "
             f"(RSS is more: the interpreter, libraries, freed pages kept)"]
    lines += malloc_lines()
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
    if frames := int(os.environ.get("FLYWHEEL_HEAP_FRAMES", "8")):
        tracemalloc.start(frames)
    signal.signal(signal.SIGUSR2, report)
    from flywheel_operator.__main__ import main

    sys.argv = ["flywheel-operator", *sys.argv[1:]]
    sys.exit(main())
