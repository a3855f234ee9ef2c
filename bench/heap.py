"""The operator under tracemalloc, to see where its memory goes.

    FLYWHEEL_HEAP_OUT=.cache/heap.txt python bench/heap.py --standalone --all-namespaces ...

Runs `python -m flywheel_operator` with the given arguments, tracing every allocation
(`FLYWHEEL_HEAP_FRAMES` frames deep, default 8; 0 traces nothing), from the start or
`FLYWHEEL_HEAP_AFTER_S` seconds in. SIGUSR2 appends a report
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
import threading
import time
import tracemalloc

OUT = os.environ.get("FLYWHEEL_HEAP_OUT", "heap.txt")
_types: list[collections.Counter] = []  # the first two reports' type counts
_snapshots: list[tracemalloc.Snapshot] = []  # the first two reports' (the second: warmed up)


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
    lines = [f"--- glibc malloc: {m.uordblks / mib:.1f} MiB in use, {m.fordblks / mib:.1f} MiB "
             f"free in its arenas ({m.arena / mib:.1f} MiB arenas, {m.hblkhd / mib:.1f} MiB in "
             f"{m.hblks} mmap'd blocks); threads {len(os.listdir('/proc/self/task'))}",
             # Python's own allocator (objects up to 512 bytes) maps its arenas itself: glibc's
             # figures above never include them
             f"--- Python's allocator: {sys.getallocatedblocks()} blocks in use",
             "--- objects the collector tracks, by type: " + ", ".join(
                 f"{name} {count}" for name, count in objects.most_common(15))]
    _types.append(objects)
    if len(_types) > 2:  # the types that grew since the second report (after warm-up)
        grown = objects.copy()
        grown.subtract(_types[1])
        lines.append("--- types grown since the second report: " + ", ".join(
            f"{name} {count:+d}" for name, count in grown.most_common(15) if count > 0))
        del _types[2:]
    return lines


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
    if len(_snapshots) == 2:  # what grew since the second report: where a slow creep is from
        lines += ["--- growth since the second report, by allocation site"]
        for stat in snapshot.compare_to(_snapshots[1], "traceback")[:20]:
            lines.append(f"{stat.size_diff / 2**20:+8.2f} MiB {stat.count_diff:+9d} blocks")
            lines += [f"      {f.filename}:{f.lineno}" for f in stat.traceback[:8]]
    else:
        _snapshots.append(snapshot)
    with open(OUT, "a") as out:
        out.write("\n".join(lines) + "\n")


def trace_from(seconds: float, frames: int) -> None:
    """Start tracing only after `seconds` (a soak's warm-up untraced: tracing slows the
    operator down several times, too much for a whole soak on a small machine)."""
    if seconds <= 0:
        tracemalloc.start(frames)
        return
    timer = threading.Timer(seconds, tracemalloc.start, (frames,))
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    if frames := int(os.environ.get("FLYWHEEL_HEAP_FRAMES", "8")):
        trace_from(float(os.environ.get("FLYWHEEL_HEAP_AFTER_S", "0")), frames)
    signal.signal(signal.SIGUSR2, report)
    from flywheel_operator.__main__ import main

    sys.argv = ["flywheel-operator", *sys.argv[1:]]
    sys.exit(main())
