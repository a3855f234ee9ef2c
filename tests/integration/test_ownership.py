"""Children are the run's by owner uid, on the real control plane: a run deleted and applied
again under the same name never adopts or reuses its predecessor's objects, and an object of
a child's name that is not the run's is reported, never adopted nor deleted."""

from __future__ import annotations

import pytest

from tests.conftest import Cluster, wait_until
from tests.integration.test_operator import jobs_of, manifest, run_status, running_pods

pytestmark = pytest.mark.cluster

HOLD = "flywheel.dev/test-hold"


def condition(status: dict, type_: str) -> dict:
    return next((c for c in status.get("conditions") or [] if c["type"] == type_), {})


def test_a_run_applied_again_does_not_adopt_its_predecessors_job(cluster: Cluster, operator,
                                                                 namespace):
    cluster.apply(manifest("again", nodes=1), namespace)
    running_pods(cluster, namespace, "again", 1, 1)
    (old_job,) = jobs_of(cluster, namespace, "again")
    old_uid = cluster.get("ftr", "again", "-n", namespace)["metadata"]["uid"]
    # Hold the old Job so that it outlives its run (as a slow garbage collector would).
    cluster.kubectl("patch", "job", old_job["metadata"]["name"], "-n", namespace,
                    "--type=merge", "-p", f'{{"metadata":{{"finalizers":["{HOLD}"]}}}}')
    try:
        cluster.kubectl("delete", "ftr", "again", "-n", namespace, "--wait=true")
        cluster.apply(manifest("again", nodes=1), namespace)
        new_uid = cluster.get("ftr", "again", "-n", namespace)["metadata"]["uid"]
        assert new_uid != old_uid

        # The name of attempt 1's objects is taken: the run says so, naming the object.
        status = wait_until(lambda: condition(s := run_status(cluster, namespace, "again"),
                                              "Conflict").get("status") == "True" and s,
                            timeout=60, message="the new run reports the conflict")
        message = condition(status, "Conflict")["message"]
        assert "again-a1" in message and old_uid in message, message
        assert status.get("phase") != "Running"
        # The old Job is still the old run's, untouched (only its finalizer holds it).
        job = cluster.get("job", old_job["metadata"]["name"], "-n", namespace)
        assert job["metadata"]["uid"] == old_job["metadata"]["uid"]
        assert [r["uid"] for r in job["metadata"]["ownerReferences"]] == [old_uid]
    finally:
        cluster.kubectl("patch", "job", old_job["metadata"]["name"], "-n", namespace,
                        "--type=merge", "-p", '{"metadata":{"finalizers":null}}', check=False)

    # Once the garbage collector has taken it, the new run creates attempt 1 of its own.
    def own_job():
        jobs = jobs_of(cluster, namespace, "again")
        return (len(jobs) == 1 and jobs[0]["metadata"]["ownerReferences"][0]["uid"] == new_uid
                and jobs[0]["metadata"]["uid"] != old_job["metadata"]["uid"] and jobs[0])
    wait_until(own_job, timeout=120, message="the new run's own Job")
    wait_until(lambda: condition(run_status(cluster, namespace, "again"),
                                 "Conflict").get("status") == "False",
               timeout=60, message="the conflict clears")


def test_a_service_of_the_runs_name_owned_by_nothing_is_never_deleted(cluster: Cluster,
                                                                      operator, namespace):
    # Someone's own Service happens to carry the name attempt 1's Service would have.
    cluster.apply({"apiVersion": "v1", "kind": "Service",
                   "metadata": {"name": "clash-a1", "namespace": namespace,
                                "labels": {"app": "theirs"}},
                   "spec": {"clusterIP": "None", "selector": {"app": "theirs"},
                            "ports": [{"name": "http", "port": 80}]}})
    theirs = cluster.get("service", "clash-a1", "-n", namespace)["metadata"]["uid"]
    cluster.apply(manifest("clash", nodes=2), namespace)
    status = wait_until(lambda: condition(s := run_status(cluster, namespace, "clash"),
                                          "Conflict").get("status") == "True" and s,
                        timeout=60, message="the run reports the conflict")
    assert "Service" in condition(status, "Conflict")["message"]
    assert "owned by nothing" in condition(status, "Conflict")["message"]
    assert not jobs_of(cluster, namespace, "clash"), "no Job without its Service"

    cluster.kubectl("delete", "ftr", "clash", "-n", namespace, "--wait=true")
    service = cluster.get("service", "clash-a1", "-n", namespace)
    assert service["metadata"]["uid"] == theirs
    assert not service["metadata"].get("ownerReferences")
