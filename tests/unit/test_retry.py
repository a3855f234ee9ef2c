"""A reconcile that fails is retried with backoff until it succeeds (waker.Waker)."""

from __future__ import annotations

import time

from flywheel_operator.waker import MAX_BACKOFF, Waker


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
        waker.due.clear()  # as if it had been popped
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, MAX_BACKOFF]
    assert waker.failures == {("ns", "r"): 10}
    waker.attempt(("ns", "r"))  # succeeds: no retry, and the next failure starts at 1 s again
    assert not waker.heap and not waker.failures and len(calls) == 11


def test_one_slow_reconcile_holds_up_no_other_run_and_waiting_wakeups_collapse():
    import threading

    release, started = threading.Event(), threading.Event()
    calls: list[tuple[str, str]] = []
    done = threading.Semaphore(0)

    def reconcile(key):
        calls.append(key)
        if key == ("ns", "slow") and not started.is_set():
            started.set()
            release.wait(10)  # a slow API call
        done.release()

    waker = Waker("test", workers=4)
    waker.start_with(reconcile)
    waker.wake(("ns", "slow"))
    assert started.wait(10)
    # While "slow" is in its reconcile, three wake-ups of it queue one more reconcile (they
    # may carry new state), and other runs go on.
    for _ in range(3):
        waker.wake(("ns", "slow"))
    for i in range(5):
        waker.wake(("ns", f"r{i}"))
    for _ in range(5):
        assert done.acquire(timeout=10)
    assert sorted(k for k in calls if k[1] != "slow") == [("ns", f"r{i}") for i in range(5)]
    release.set()
    for _ in range(2):  # the first slow one, and the one its three wake-ups collapsed into
        assert done.acquire(timeout=10)
    assert not done.acquire(timeout=0.5)
    assert calls.count(("ns", "slow")) == 2



def test_a_keys_lock_serialises_while_held_and_leaves_no_entry_behind():
    # A fleet's deleted runs must not leave a lock each: the table holds only locks in use.
    import threading

    from flywheel_operator import metrics, waker
    from flywheel_operator.config import OperatorConfig
    from flywheel_operator.reconciler import Reconciler
    from prometheus_client import generate_latest

    before = waker.lock_count()
    got: list[bool] = []
    with waker.lock(("ns", "run-0")):
        assert waker.lock_count() == before + 1
        thread = threading.Thread(
            target=lambda: got.append(waker.lock(("ns", "run-0")).acquire(blocking=False)))
        thread.start()
        thread.join()
        for i in range(1, 100):
            with waker.lock(("ns", f"run-{i}")):
                pass
    assert got == [False]  # the same lock, held
    assert waker.lock_count() == before
    # The operator's tables are exported, so that a soak sees one that grows.
    Reconciler(OperatorConfig())
    assert f'flywheel_operator_table_entries{{table="locks"}} {before}.0'.encode() in (
        generate_latest(metrics.REGISTRY))


def test_a_burst_of_wakeups_within_the_batch_is_one_reconcile():
    # A pod created, scheduled and running within a second: one reconcile, one status write.
    calls = []
    waker = Waker("test")
    for _ in range(5):
        waker.wake(("ns", "r"), 0.3)
    waker.wake(("ns", "r"), 5.0)  # later than one already due: covered by it
    assert len(waker.heap) == 1
    waker.start_with(calls.append)
    time.sleep(1.0)
    assert calls == [("ns", "r")] and not waker.due
    waker.wake(("ns", "r"), 0.0)  # a new wake-up after the reconcile is news again
    time.sleep(0.5)
    assert calls == [("ns", "r")] * 2
