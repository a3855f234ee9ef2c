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


def survivors(path: str, start_min: float, end_min: float, top: int = 25) -> None:
    """The allocation sites of a memray recording whose blocks, allocated between minutes
    `start_min` and `end_min` of it, were never freed: in a soak whose runs live minutes,
    what a window long before the end still holds at the end is what accumulates."""
    import memray

    reader = memray.FileReader(path)
    times = [s.time for s in reader.get_memory_snapshots()]  # ms since the epoch
    first = [i for i, t in enumerate(times) if t - times[0] >= start_min * 60_000]
    last = [i for i, t in enumerate(times) if t - times[0] <= end_min * 60_000]
    lo, hi = first[0], last[-1]
    sites: collections.Counter = collections.Counter()
    counts: collections.Counter = collections.Counter()
    for record in reader.get_temporal_allocation_records(merge_threads=True):
        kept = [i for i in record.intervals if i.deallocated_before_snapshot is None
                and lo <= i.allocated_before_snapshot <= hi]
        if not kept:
            continue
        frames = [f"{f[0]} {f[1]}:{f[2]}" for f in record.hybrid_stack_trace(12)]
        key = "\n      ".join(frames)
        sites[key] += sum(i.n_bytes for i in kept)
        counts[key] += sum(i.n_allocations for i in kept)
    total = sum(sites.values())
    print(f"{total / 2**20:.2f} MiB in {sum(counts.values())} blocks allocated in minutes "
          f"{start_min}-{end_min} of {(times[-1] - times[0]) / 60_000:.1f}, alive at the end")
    for key, size in sites.most_common(top):
        print(f"{size / 2**10:10.1f} KiB {counts[key]:8d} blocks\n      {key}")


def record_with_memray(path: str) -> int:
    import memray
    from flywheel_operator.__main__ import main

    with memray.Tracker(path, native_traces=True, memory_interval_ms=1000):
        return main()


if __name__ == "__main__":
    if sys.argv[1:2] == ["--survivors"]:
        survivors(sys.argv[2], float(sys.argv[3]), float(sys.argv[4]))
        sys.exit(0)
    signal.signal(signal.SIGUSR2, report)
    sys.argv = ["flywheel-operator", *sys.argv[1:]]
    if memray_out := os.environ.get("FLYWHEEL_HEAP_MEMRAY"):
        sys.exit(record_with_memray(memray_out))
    if frames := int(os.environ.get("FLYWHEEL_HEAP_FRAMES", "8")):
        trace_from(float(os.environ.get("FLYWHEEL_HEAP_AFTER_S", "0")), frames)
    from flywheel_operator.__main__ import main

    sys.exit(main())
