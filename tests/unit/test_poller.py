"""The progress poller: one thread, bounded per run, keeps the last answer (fake HTTP)."""

from __future__ import annotations

import threading
import time

from flywheel_operator.objects import PodSummary
from flywheel_operator.observe import progress_url, rank0
from flywheel_operator.poller import Poller


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    raise AssertionError("timed out")


def test_polls_each_run_keeps_the_last_answer_and_wakes_its_reconcile():
    answers = {"http://a/progress": [{"step": 1}, ValueError("refused"), {"step": 2}]}
    calls: list[str] = []
    woken: list[tuple] = []
    lock = threading.Lock()

    def get(url, timeout):
        with lock:
            calls.append(url)
            queue = answers[url]
            answer = queue.pop(0) if len(queue) > 1 else queue[0]
        if isinstance(answer, Exception):
            raise answer
        return answer

    poller = Poller(interval=0.05, on_update=woken.append, get=get)
    poller.want(("ns", "r"), 1, "http://a/progress")
    wait_for(lambda: (p := poller.polled(("ns", "r"))) and p.error)
    failed = poller.polled(("ns", "r"))
    assert failed.doc == {"step": 1} and failed.error == "ValueError: refused"  # kept
    assert failed.fetched_at and failed.first_polled_at
    wait_for(lambda: poller.polled(("ns", "r")).doc == {"step": 2})
    assert poller.polled(("ns", "r")).error is None
    assert ("ns", "r") in woken
    # a new attempt starts from nothing; a dropped run is not polled any more
    poller.want(("ns", "r"), 2, "http://a/progress")
    wait_for(lambda: poller.polled(("ns", "r")).attempt == 2)
    poller.drop(("ns", "r"))
    assert poller.polled(("ns", "r")) is None
    time.sleep(0.1)
    n = len(calls)
    time.sleep(0.2)
    assert len(calls) <= n + 1  # at most one poll was already in flight


def test_progress_url_from_the_pod_summary():
    assert progress_url(PodSummary("p", ip="10.1.2.3", progress_port=9400)) == \
        "http://10.1.2.3:9400/progress"
    assert progress_url(PodSummary("p", ip="fd00::5", progress_port=9400)) == \
        "http://[fd00::5]:9400/progress"
    assert progress_url(PodSummary("p", progress_port=9400)) is None
    assert progress_url(None) is None


def test_the_pod_polled_is_the_running_rank_0_of_the_attempt():
    pods = [PodSummary("a1-0", attempt=1, index=0, phase="Failed"),
            PodSummary("a2-1", attempt=2, index=1, phase="Running"),
            PodSummary("a2-0", attempt=2, index=0, phase="Running"),
            PodSummary("pre", component="preflight", attempt=2, index=0, phase="Running")]
    assert rank0(pods, 2).name == "a2-0"
    assert rank0(pods, 1) is None  # its rank 0 no longer runs
