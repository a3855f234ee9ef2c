"""`python -m flywheel_operator` (or `flywheel-operator`): run the Flywheel operator."""

from __future__ import annotations

import argparse
import ctypes
import gc
import logging
import random
import re
import sys
import threading
import time

import yaml

from .config import load_config


def return_free_memory_every(seconds: float) -> threading.Thread | None:
    """Hand glibc's free pages back to the kernel every `seconds`: runs come and go in waves,
    and glibc keeps what they freed in its arenas. `malloc_trim(0)` returns every whole free
    page of every arena (madvise), a few milliseconds without the GIL. With the image's
    allocator settings (Python's objects on malloc, no per-thread cache: operator.Dockerfile)
    that is every page freed, and the soak's resident size stayed flat for 30 minutes
    (bench/RESULTS.md, "Soak"). None where libc is not glibc."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # musl, macOS: nothing to trim
        return None
    trim.argtypes, trim.restype = [ctypes.c_size_t], ctypes.c_int

    def loop() -> None:
        while True:
            time.sleep(seconds)
            trim(0)

    thread = threading.Thread(target=loop, name="flywheel-malloc-trim", daemon=True)
    thread.start()
    return thread


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="flywheel-operator", description=__doc__)
    parser.add_argument("--config", help="operator config YAML (node pools, default image)")
    scope = parser.add_mutually_exclusive_group()
    scope.add_argument("-A", "--all-namespaces", action="store_true",
                       help="watch every namespace (needs a ClusterRole)")
    scope.add_argument("-n", "--namespace", action="append", default=[],
                       help="watch this namespace (repeatable; needs Roles only)")
    peering = parser.add_mutually_exclusive_group()
    peering.add_argument("--standalone", action="store_true",
                         help="no peering: only for development, never run two of these")
    peering.add_argument("--peering", default="flywheel",
                         help="kopf peering object for HA (default: flywheel)")
    parser.add_argument("--priority", type=int, default=None,
                        help="peering priority: the highest active peer works, the others "
                        "stand by (default: random, so replicas never tie)")
    parser.add_argument("--liveness", default="http://0.0.0.0:8080/healthz",
                        help="kopf health endpoint")
    parser.add_argument("--metrics-port", type=int, default=9090,
                        help="Prometheus metrics port (0 disables)")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    if not (args.all_namespaces or args.namespace):
        parser.error("choose --all-namespaces or --namespace NS")
    for ns in args.namespace:  # each is listed and watched by name (watches.py)
        if not re.fullmatch(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?", ns):
            parser.error(f"--namespace {ns!r}: not a namespace's name (name each namespace; "
                         "patterns are not supported)")
    try:  # at start-up: a bad file stops the operator before it watches anything
        config = load_config(args.config)
    except (OSError, ValueError, yaml.YAMLError) as err:  # ValueError: pydantic's too
        parser.error(f"--config {args.config}: {err}")

    import kopf

    from . import handlers  # registers the handlers

    if config.kueue.enabled:
        handlers.watch_kueue()

    # What start-up built (modules, pydantic's and kopf's tables) lives as long as the
    # process: out of the collector's sight, a full collection in a burst scans only what
    # the runs brought (in a 200-run burst 0.26 s of GC instead of 0.5-0.7, pauses halved).
    gc.collect()
    gc.freeze()
    return_free_memory_every(60.0)
    # ~100 threads mostly wait on the API; one woken by its response waits for the GIL up
    # to the switch interval while the event loop decodes a burst's events. 1 ms instead of
    # 5: in a 200-run burst apply -> Job p50 1.84 -> 1.32 s, p99 2.48 -> 2.29 s, the same
    # CPU per run (bench/RESULTS.md).
    sys.setswitchinterval(0.001)
    kopf.configure(verbose=args.verbose)
    if not args.verbose:  # one line per handled watch event is noise at this scale
        logging.getLogger("kopf.objects").setLevel(logging.WARNING)
    kopf.run(
        clusterwide=args.all_namespaces,
        namespaces=args.namespace,
        standalone=args.standalone,
        peering_name=None if args.standalone else args.peering,
        priority=None if args.standalone else (
            args.priority if args.priority is not None else random.randint(1, 2**31 - 1)),
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(config=config, metrics_port=args.metrics_port,
                       peering=not args.standalone,
                       namespaces=[] if args.all_namespaces else args.namespace))


if __name__ == "__main__":
    main()
