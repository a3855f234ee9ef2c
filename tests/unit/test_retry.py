"""A reconcile that fails is retried with backoff until it succeeds (handlers.Waker)."""

from __future__ import annotations

import time

from flywheel_operator.handlers import MAX_BACKOFF, Waker


def test_a_failing_reconcile_comes_back_with_growing_backoff_until_it_succeeds():
    calls = []

    def reconcile(key):
        calls.append(key)
        if len(calls) <= 10:
            raise RuntimeError("the API server is away")

    waker = Waker("test")
    waker.reconcile = reconcile  # not started: we look at what it schedules
    delays = []
    for _ in range(10):
        before = time.monotonic()
        waker.attempt(("ns", "r"))
        delays.append(round(max(waker.heap)[0] - before))
        waker.heap.clear()
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, MAX_BACKOFF]
    assert waker.failures == {("ns", "r"): 10}
    waker.attempt(("ns", "r"))  # succeeds: no retry, and the next failure starts at 1 s again
    assert not waker.heap and not waker.failures and len(calls) == 11
