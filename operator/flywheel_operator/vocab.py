"""The operator's shared vocabulary, defined once: API group, kinds, labels, phases, conditions,
times, owner references, tracking identity and GPU-hour / cost arithmetic.

The bottom layer: it imports nothing from the operator, and every other module takes these
names from here instead of repeating a string.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal, get_args

GROUP = "flywheel.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
#: Our kinds and their resource plurals (kube paths, CRD names, kopf registrations).
PLURALS = {"FineTuneRun": "finetuneruns", "ModelVersion": "modelversions", "Model": "models",
           "FineTuneSchedule": "finetuneschedules"}

# --- labels and annotations ----------------------------------------------------------------
RUN_LABEL = f"{GROUP}/run"                           # a run's children; a version's run
ATTEMPT_LABEL = f"{GROUP}/attempt"                   # an attempt's Job, Service, ConfigMap, pods
COMPONENT_LABEL = f"{GROUP}/component"               # trainer or preflight
MODEL_LABEL = f"{GROUP}/model"                       # a ModelVersion's Model
RUN_UID_LABEL = f"{GROUP}/source-run-uid"            # a ModelVersion's FineTuneRun uid
SCHEDULE_LABEL = f"{GROUP}/schedule"                 # a run created by a FineTuneSchedule
POOL_LABEL = f"{GROUP}/pool"                         # node label of the built-in pools
EXECUTOR_LABEL = f"{GROUP}/executor"                 # node label of the local executor's nodes
SCHEDULED_AT_ANNOTATION = f"{GROUP}/scheduled-at"    # the tick a scheduled run is for
TRIGGER_ANNOTATION = f"{GROUP}/trigger"              # on a schedule: start a run now
DIGEST_ANNOTATION = f"{GROUP}/model-digest"          # on a served Deployment's pod template
URI_ANNOTATION = f"{GROUP}/model-uri"                # beside it (for a fetch init container)
KSERVE_API_VERSION = "serving.kserve.io/v1beta1"
MANAGED_BY = {"app.kubernetes.io/managed-by": "flywheel-operator"}
# Kueue (https://kueue.sigs.k8s.io): the labels that put a Job in a queue, with a priority.
KUEUE_API_VERSION = "kueue.x-k8s.io/v1beta2"
KUEUE_VISIBILITY_API_VERSION = "visibility.kueue.x-k8s.io/v1beta2"
QUEUE_NAME_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
#: Rank 0's progress endpoint: the trainer pod's named container port (GET /progress).
PROGRESS_PORT_NAME, PROGRESS_PORT = "progress", 9400

# --- phases ----------------------------------------------------------------------------------
RunPhase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
RUN_PHASES: tuple[str, ...] = get_args(RunPhase)
TERMINAL = ("Succeeded", "Failed")  # a run's final phases
Key = tuple[str, str]  # (namespace, name) of a run or a schedule


@dataclass(frozen=True)
class Written:
    """A status the operator wrote: the `status`, the resourceVersion the write returned, and
    the versions known to be older than it (`older`: the one it was based on and, while the
    watch lags behind, those of our own earlier writes). A copy of the object at one of
    them has not caught up with the write yet."""

    status: dict
    returned: str | None
    older: frozenset[str]


def wrote(previous: Written | None, based_on: str, returned: str | None,
          status: dict) -> Written:
    """What a write of `status` over the object at `based_on` leaves to trust. Based on a copy
    that lagged behind an earlier write, every version up to that write's is older still."""
    older = {based_on}
    if previous is not None and based_on in previous.older:
        older |= previous.older | ({previous.returned} if previous.returned else set())
    return Written(status, returned, frozenset(older))


def trusted(obj: dict, written: Written | None) -> dict:
    """The object with the status to trust: the one we last wrote while the watch has not yet
    delivered it (the copy is at a version older than the write), else the object's own."""
    if written and obj["metadata"]["resourceVersion"] in written.older:
        return {**obj, "status": written.status}
    return obj


MODEL_REF_SCHEME = "model://"  # a registry base model: model://MODEL@ALIAS, model://MODEL/N

# --- times: RFC3339 in UTC with second precision (`2026-11-26T03:00:00Z`) ----------------------


def parse_time(value: datetime | str | None) -> datetime | None:
    """An RFC3339 string (`...Z` or with offset) or datetime as an aware UTC datetime."""
    if value is None or value == "":
        return None
    if isinstance(value, datetime):
        dt = value
    else:
        dt = datetime.fromisoformat(str(value).replace("Z", "+00:00").replace("z", "+00:00"))
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.astimezone(UTC)


def format_time(value: datetime | str | None = None) -> str:
    """`value` (default: now) as Kubernetes writes times: `2026-11-26T03:00:00Z`."""
    return parse_time(value or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")  # type: ignore


# --- conditions and owners ------------------------------------------------------------------


def set_condition(status: dict, type_: str, value: bool, reason: str, message: str,
                  now: str, generation: int | None) -> None:
    """Upsert a standard condition; lastTransitionTime moves only when the value does."""
    conditions = status.setdefault("conditions", [])
    new = {"type": type_, "status": "True" if value else "False", "reason": reason,
           "message": message}
    if generation is not None:
        new["observedGeneration"] = generation
    for i, old in enumerate(conditions):
        if old.get("type") == type_:
            same = old.get("status") == new["status"]
            new["lastTransitionTime"] = old.get("lastTransitionTime", now) if same else now
            conditions[i] = new
            return
    new["lastTransitionTime"] = now
    conditions.append(new)


def owner_reference(owner: dict[str, Any], kind: str = "FineTuneRun") -> dict[str, Any]:
    """Controller ownerReference to `owner` (GC deletes the children with it)."""
    meta = owner["metadata"]
    return {"apiVersion": API_VERSION, "kind": kind, "name": meta["name"], "uid": meta["uid"],
            "controller": True, "blockOwnerDeletion": True}


# --- tracking identity ----------------------------------------------------------------------


def experiment_key(uid: str) -> str:
    """Comet experiment key: 32 hex chars derived from the run uid, the same for every attempt."""
    return hashlib.sha256(f"flywheel:{uid}".encode()).hexdigest()[:32]


def comet_experiment_url(workspace: str, project: str, key: str) -> str:
    """URL of a Comet experiment."""
    return f"https://www.comet.com/{workspace}/{project}/{key}"


# --- GPU-hours and cost -----------------------------------------------------------------------


def estimate_gpu_hours(tokens: int, tokens_per_second_per_gpu: float | None,
                       epochs: int = 1) -> float | None:
    """GPU-hours to train `tokens` per epoch at a pool's throughput figure (None: unknown).

    The world size cancels out: N GPUs take 1/N of the time, N GPU-hours per hour.
    """
    if not tokens_per_second_per_gpu:
        return None
    return tokens * epochs / tokens_per_second_per_gpu / 3600.0


def pods_gpu_hours(pods: list, gpus_per_node: int, now: str) -> float:
    """GPU-hours pods (objects.PodSummary) held: each pod's running time (started_at ..
    finished_at or now) x its GPUs."""
    total = 0.0
    for pod in pods:
        if pod.started_at:
            end = parse_time(pod.finished_at or now)
            total += max(0.0, (end - parse_time(pod.started_at)).total_seconds())  # type: ignore
    return round(total / 3600 * gpus_per_node, 6)


def estimate_cost(gpu_hours: float | None, gpu_hour_price: float) -> float | None:
    """Cost of `gpu_hours` at a pool's gpuHourPrice."""
    return None if gpu_hours is None else round(gpu_hours * gpu_hour_price, 4)
