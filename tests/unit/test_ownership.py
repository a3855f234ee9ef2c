"""A run owns its state: its own output and checkpoint directories, its own children (by
owner uid), registry references resolved once, and a registration that cannot spin."""

from __future__ import annotations

import json

import pytest
from flywheel_operator import registry, render
from flywheel_operator.api import status_document
from flywheel_operator.lifecycle import decide
from flywheel_operator.objects import job_summary, owned, pod_summary
from flywheel_trainer import contract
from flywheel_trainer.config import TrainerConfig

from .conftest_data import make_run, with_status

DIGEST = "sha256:" + "cd" * 32
UID = "6f1c2a9e-2b1d-4c0a-9d8e-0123456789ab"


def _summary() -> contract.Summary:
    return contract.parse_summary(json.dumps({
        "artifact": {"uri": "s3://m/out/run-6f1c2a9e/", "digest": DIGEST},
        "metrics": {"eval_loss": 1.0}, "steps": 4, "tokens": 100}))


# --- run-scoped directories -------------------------------------------------------------


def test_two_runs_on_one_output_get_their_own_directories():
    a = make_run("week-1", output={"uri": "s3://m/out/"})
    b = make_run("week-2", output={"uri": "s3://m/out/"},
                 uid="0a1b2c3d-0000-0000-0000-000000000000")
    again = make_run("week-1", output={"uri": "s3://m/out"},  # deleted and applied again
                     uid="99999999-0000-0000-0000-000000000000")
    paths = {render.run_paths(r) for r in (a, b, again)}
    assert len(paths) == 3
    assert render.run_paths(a) == ("s3://m/out/week-1-6f1c2a9e/",
                                   "s3://m/out/week-1-6f1c2a9e/checkpoints/")
    # an explicit checkpoint location is scoped to the run too
    c = make_run("week-1", output={"uri": "s3://m/out/"}, checkpoint={"uri": "s3://ck/"})
    assert render.run_paths(c)[1] == "s3://ck/week-1-6f1c2a9e/"


def test_new_run_records_its_directories_in_status():
    run = make_run(output={"uri": "s3://m/out/"}, preflight={"enabled": False})
    plan = decide(run, [], [])
    assert plan.create_attempt == 1
    assert plan.status.outputUri == "s3://m/out/qwen-w48-6f1c2a9e/"
    assert plan.status.checkpointUri == "s3://m/out/qwen-w48-6f1c2a9e/checkpoints/"


def test_resume_from_reaches_the_trainer():
    run = make_run(resumeFrom="s3://m/other/checkpoints/step-8/")
    cfg = render.trainer_config(run, 1)
    assert cfg.resumeFrom == "s3://m/other/checkpoints/step-8/"
    assert cfg.checkpoint_uri().startswith("s3://")  # its own place, not resumeFrom


# --- children by owner uid --------------------------------------------------------------


def _job_body(uid: str, owner: str | None) -> dict:
    refs = [{"kind": "FineTuneRun", "name": "qwen-w48", "uid": owner}] if owner else []
    return {"metadata": {"name": "qwen-w48-a1", "uid": uid, "ownerReferences": refs,
                         "labels": {"flywheel.dev/run": "qwen-w48",
                                    "flywheel.dev/attempt": "1"}},
            "spec": {}, "status": {}}


def _pod_body(job_uid: str) -> dict:
    return {"metadata": {"name": "p", "labels": {"flywheel.dev/attempt": "1"},
                         "ownerReferences": [{"kind": "Job", "name": "qwen-w48-a1",
                                              "uid": job_uid}]},
            "spec": {}, "status": {"phase": "Running"}}


def test_a_namesakes_job_and_pods_are_not_the_runs():
    ours, theirs, orphan = (job_summary(_job_body("j1", UID)),
                            job_summary(_job_body("j2", "old-run-uid")),
                            job_summary(_job_body("j3", None)))
    pods = [pod_summary(_pod_body("j1")), pod_summary(_pod_body("j2")),
            pod_summary(_pod_body("j3"))]
    jobs, mine = owned(UID, [ours, theirs, orphan], pods)
    assert [j.uid for j in jobs] == ["j1"]
    assert [p.job for p in mine] == ["j1"]
    # a re-applied run (a new uid) sees none of them: it starts from scratch
    assert owned("new-uid", [ours, theirs, orphan], pods) == ([], [])


# --- registry references ----------------------------------------------------------------


@pytest.mark.parametrize("uri, ref", [
    ("model://flow-agent@production", registry.ModelRef("flow-agent", alias="production")),
    ("model://flow-agent/7", registry.ModelRef("flow-agent", version=7)),
    ("s3://b/m/", None), ("model://Flow@x", None), ("model://m/0", None), ("model://m", None),
])
def test_parse_ref(uri, ref):
    assert registry.parse_ref(uri) == ref


def _model(aliases: dict) -> dict:
    return {"metadata": {"name": "flow-agent"}, "status": {"aliases": aliases}}


def _mv(version: int, model: str = "flow-agent") -> dict:
    return {"metadata": {"name": f"{model}-v{version}"},
            "spec": {"modelName": model, "version": version,
                     "artifact": {"uri": f"s3://m/out/r{version}/", "digest": DIGEST}}}


def test_an_alias_resolves_to_where_it_points_now():
    ref = registry.parse_ref("model://flow-agent@production")
    model = _model({"production": {"version": 3, "modelVersion": "flow-agent-v3"}})
    name = registry.ref_version_name(ref, model)
    assert name == "flow-agent-v3"
    resolved = registry.resolve_ref("model://flow-agent@production", ref, _mv(3), name)
    assert status_document(resolved) == {
        "ref": "model://flow-agent@production", "modelVersion": "flow-agent-v3", "version": 3,
        "uri": "s3://m/out/r3/", "digest": DIGEST}


@pytest.mark.parametrize("uri, model, mv, words", [
    ("model://flow-agent@production", None, None, "Model flow-agent does not exist"),
    ("model://flow-agent@production", _model({"latest": {"modelVersion": "flow-agent-v1"}}),
     None, "no alias production .aliases: latest"),
    ("model://flow-agent/9", _model({}), None, "ModelVersion flow-agent-v9 .* does not exist"),
    ("model://flow-agent/2", _model({}), _mv(2, "other"), "a version of other"),
])
def test_unresolvable_references_say_why(uri, model, mv, words):
    ref = registry.parse_ref(uri)
    with pytest.raises(registry.RefError, match=words):
        name = registry.ref_version_name(ref, model)
        registry.resolve_ref(uri, ref, mv, name)


def test_a_registry_base_model_is_resolved_once_and_verified_by_digest():
    run = make_run(baseModel="model://flow-agent@production", preflight={"enabled": False})
    resolved = registry.resolve_ref(run.spec.baseModel,
                                    registry.parse_ref(run.spec.baseModel), _mv(3),
                                    "flow-agent-v3")
    plan = decide(run, [], [], base_model=resolved)
    assert plan.status.baseModel == resolved
    assert plan.create_attempt == 1
    cfg = render.trainer_config(with_status(run, plan.status), 1)
    assert (cfg.baseModel, cfg.baseModelDigest, cfg.parentVersion) == (
        "s3://m/out/r3/", DIGEST, "flow-agent-v3")
    # recorded: the next decision keeps it whatever the alias does meanwhile
    later = decide(with_status(run, plan.status), [], [], base_model="alias moved")
    assert later.status.baseModel == resolved
    # the version it produces names its parent
    mv = registry.model_version(with_status(run, plan.status), _summary(), 4, None,
                                "production")
    assert mv["spec"]["parent"] == {"modelVersion": "flow-agent-v3", "version": 3,
                                    "digest": DIGEST, "ref": "model://flow-agent@production"}
    assert mv["spec"]["baseModel"] == "s3://m/out/r3/"


def test_a_reference_to_nothing_fails_the_run_at_once():
    run = make_run(baseModel="model://flow-agent@production")
    plan = decide(run, [], [], base_model="Model flow-agent does not exist in this namespace")
    assert plan.status.phase == "Failed"
    assert plan.create_attempt is None and not plan.create_preflight
    (failed,) = [c for c in plan.status.conditions if c.type == "Failed"]
    assert failed.reason == "BaseModelNotFound"
    assert "model://flow-agent@production" in failed.message
    with pytest.raises(ValueError, match="not resolved"):
        render.trainer_config(run, 1)


def test_the_trainer_config_is_valid_for_a_plain_uri():
    cfg = render.trainer_config(make_run(), 1)
    assert isinstance(cfg, TrainerConfig) and cfg.baseModelDigest is None


# --- bounded registration ---------------------------------------------------------------


class Store:
    """ModelVersions by name, as the API server holds them (labels select the model's)."""

    def __init__(self, objects: list[dict]):
        self.objects = {o["metadata"]["name"]: o for o in objects}
        self.creates = self.lists = 0

    def listed(self, uid: str | None = None) -> list[dict]:
        """The model's versions, only those labelled with run `uid` when given."""
        self.lists += uid is None
        return [o for o in self.objects.values()
                if (o["metadata"].get("labels") or {}).get("flywheel.dev/model") == "m"
                and uid in (None, o["metadata"]["labels"].get("flywheel.dev/source-run-uid"))]

    def create(self, obj: dict) -> bool:
        self.creates += 1
        if obj["metadata"]["name"] in self.objects:
            return False
        self.objects[obj["metadata"]["name"]] = obj
        return True


def _version(number: int, run_uid: str | None, labelled: bool = True) -> dict:
    labels = {"flywheel.dev/model": "m", "flywheel.dev/source-run-uid": run_uid} if labelled \
        else {}
    return {"metadata": {"name": f"m-v{number}", "labels": labels},
            "spec": {"version": number, "sourceRun": {"name": "r", "uid": run_uid}}}


def _allocate(store: Store, uid: str = UID, known: tuple[int, ...] = ()):
    return registry.allocate_version(
        uid, make=lambda n: _version(n, uid), known=known,
        list_own=lambda: store.listed(uid), list_versions=store.listed,
        create=store.create, get=store.objects.get)


def test_registration_reads_only_its_own_versions_when_the_model_is_up_to_date():
    # a Model with many versions, all recorded in its status
    store = Store([_version(n, f"u{n}") for n in range(1, 201)])
    mv = _allocate(store, known=range(1, 201))
    assert mv["metadata"]["name"] == "m-v201"
    assert store.creates == 1 and store.lists == 0


def test_a_version_the_models_status_missed_is_listed_and_passed():
    # m-v3 registered, then the operator died before recording it in the Model's status
    store = Store([_version(1, "a"), _version(2, "b"), _version(3, "c")])
    mv = _allocate(store, known=(1, 2))
    assert mv["metadata"]["name"] == "m-v4"
    assert store.creates == 2 and store.lists == 1


def test_a_number_taken_by_a_foreign_object_moves_on():
    # m-v2 exists without the model label (made by hand): listing never shows it
    store = Store([_version(1, "a"), _version(2, None, labelled=False)])
    mv = _allocate(store, known=(1,))
    assert mv["metadata"]["name"] == "m-v3"
    assert store.creates == 2


def test_a_retried_registration_finds_its_own_version():
    store = Store([_version(1, "a"), _version(2, UID)])
    mv = _allocate(store, known=(1,))  # m-v2 created, not yet recorded in the Model's status
    assert mv["metadata"]["name"] == "m-v2" and store.creates == 0


def test_our_own_create_that_looked_like_a_conflict_is_ours():
    store = Store([_version(1, "a"), _version(2, UID, labelled=False)])
    mv = _allocate(store, known=(1,))  # m-v2 is ours but unlabelled (not found by its label)
    assert mv["metadata"]["name"] == "m-v2"


def test_registration_gives_up_instead_of_spinning():
    class Full(Store):
        def create(self, obj):  # every name taken by something else, forever
            self.creates += 1
            self.objects.setdefault(obj["metadata"]["name"],
                                    _version(int(obj["metadata"]["name"][3:]), "x", False))
            return False

    store = Full([])
    with pytest.raises(RuntimeError, match="no free version number"):
        _allocate(store)
    assert store.creates == registry.MAX_VERSION_TRIES


def test_a_terminating_namespace_stops_registration():
    class Gone(Exception):
        pass

    def create(_obj):
        raise Gone

    with pytest.raises(Gone):
        registry.allocate_version(UID, make=lambda n: _version(n, UID), known=(),
                                  list_own=list, list_versions=list, create=create,
                                  get=lambda n: None)
