"""A standby replica does nothing: kopf's pause and resume reach the reconciler's timers and
poller (pure parts, no cluster)."""

from __future__ import annotations

import logging

from flywheel_operator.handlers import follow_peering
from flywheel_operator.poller import Poller
from flywheel_operator.waker import Waker


class Recorder:
    def __init__(self):
        self.calls = []

    def pause(self):
        self.calls.append("pause")

    def resume(self):
        self.calls.append("resume")


def test_kopfs_pause_and_resume_reach_the_reconciler():
    reconciler = Recorder()
    follow_peering(reconciler)  # type: ignore[arg-type]
    peering = logging.getLogger("kopf._core.engines.peering")
    # exactly what kopf's peering logs when it pauses and resumes this replica
    peering.info("Pausing operations in favour of [<Peer a: priority=20, lifetime=20>].")
    peering.warning("Pausing all operators, including self: []")
    peering.info("Resuming operations after the pause. Conflicting operators with the same "
                 "priority are gone.")
    peering.info("Keep-alive in 'flywheel' cluster-wide: ok.")
    assert reconciler.calls == ["pause", "pause", "resume"]


def test_a_paused_waker_reconciles_nothing_and_a_paused_poller_polls_nothing():
    seen = []
    waker = Waker("test")
    waker.reconcile = seen.append
    waker.pause()
    waker.attempt(("ns", "run"))
    assert seen == []
    waker.resume()
    waker.attempt(("ns", "run"))
    assert seen == [("ns", "run")]

    poller = Poller(1, on_update=lambda key: None)
    poller.pause()
    poller.want(("ns", "run"), 1, "http://127.0.0.1:9/progress")
    assert not poller.targets and not poller.started


def test_a_replica_with_peering_starts_paused_as_kopf_does():
    """kopf starts a peering replica paused and resumes it once its peering object shows no
    replica of a higher priority (the "Resuming operations" record above): the runs its own
    watches list at start-up are not reconciled before that. A standalone one starts at once."""
    import kopf
    from flywheel_operator import handlers

    for peering, paused in ((True, True), (False, False)):
        memo = kopf.Memo(metrics_port=0, peering=peering)
        handlers.configure(settings=kopf.OperatorSettings(), memo=memo)
        rec = memo.reconciler
        assert (rec.runs.paused, rec.schedules.paused, rec.models.paused) == (paused,) * 3
        assert rec.poller.paused is paused
