"""The model registry's decisions, pure: the ModelVersion record (from rank 0's summary,
flywheel_trainer.contract), which version number to take, the Model status after a
registration (versions, `latest`, promotion through gates or not, pinned aliases), registry
references (`model://`) and serving-target patches. Each returns what to write;
handlers.py writes it (kube.py), posts the events and counts the metrics.
"""

from __future__ import annotations

import copy
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from flywheel_trainer.contract import Summary

from .api import ModelStatus, ModelVersionSpec, Promotion, ResolvedModel, Run, checked
from .vocab import (
    API_VERSION,
    DIGEST_ANNOTATION,
    MODEL_LABEL,
    RUN_LABEL,
    RUN_UID_LABEL,
    URI_ANNOTATION,
    set_condition,
)

URI_ENV = "FLYWHEEL_MODEL_URI"
#: How many version numbers a registration tries before it gives up (each one taken by a
#: concurrent registration or by a foreign object of that name moves on to the next).
MAX_VERSION_TRIES = 20
#: model://MODEL@ALIAS or model://MODEL/VERSION (as in MLflow's models:/name@alias, /name/7).
MODEL_REF = re.compile(r"^model://(?P<model>[a-z0-9]([-a-z0-9]*[a-z0-9])?)"
                       r"(@(?P<alias>[a-z0-9]([-a-z0-9]*[a-z0-9])?)|/(?P<version>[1-9][0-9]*))$")


def finite_metrics(metrics: dict[str, float | None]) -> dict[str, float]:
    return {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}


def version_name(model: str, version: int) -> str:
    return f"{model}-v{version}"


def better_lower(metric: str) -> bool:
    return "loss" in metric or "perplexity" in metric


def comparison(alias: str, baseline: dict | None, metrics: dict[str, float]) -> dict | None:
    """Per-metric deltas (candidate minus baseline) against the alias's current version."""
    if not baseline:
        return None
    base = baseline["spec"].get("metrics") or {}
    return {"alias": alias, "version": baseline["spec"]["version"],
            "deltas": {k: round(v - base[k], 6) for k, v in sorted(metrics.items()) if k in base}}


# --- registry references: a run trained from a registered version ----------------------


class RefError(ValueError):
    """A model:// reference that does not name a registered version."""


@dataclass(frozen=True)
class ModelRef:
    model: str
    alias: str | None = None
    version: int | None = None


def parse_ref(uri: str) -> ModelRef | None:
    """The registry reference in a baseModel (None: not a model:// reference)."""
    m = MODEL_REF.match(uri)
    if not m:
        return None
    return ModelRef(m["model"], m["alias"], int(m["version"]) if m["version"] else None)


def ref_version_name(ref: ModelRef, model: dict | None) -> str:
    """The ModelVersion a reference names: its version, or where its alias points now."""
    if model is None:
        raise RefError(f"Model {ref.model} does not exist in this namespace")
    if ref.version is not None:
        return version_name(ref.model, ref.version)
    target = ((model.get("status") or {}).get("aliases") or {}).get(ref.alias)
    if not target or not target.get("modelVersion"):
        known = ", ".join(sorted((model.get("status") or {}).get("aliases") or {})) or "none"
        raise RefError(f"Model {ref.model} has no alias {ref.alias} (aliases: {known})")
    return target["modelVersion"]


def resolve_ref(uri: str, ref: ModelRef, mv: dict | None, name: str) -> ResolvedModel:
    """status.baseModel for a reference resolved to ModelVersion `mv` (named `name`)."""
    if mv is None:
        raise RefError(f"ModelVersion {name} (named by {uri}) does not exist")
    if mv["spec"].get("modelName") != ref.model:
        raise RefError(f"ModelVersion {name} is a version of {mv['spec'].get('modelName')}, "
                       f"not of {ref.model}")
    return ResolvedModel(ref=uri, modelVersion=name, version=mv["spec"]["version"],
                         uri=mv["spec"]["artifact"]["uri"],
                         digest=mv["spec"]["artifact"]["digest"])


def model_version(run: Run, summary: Summary, version: int, baseline: dict | None,
                  alias: str) -> dict:
    """The immutable ModelVersion record for a succeeded run (validated against the API)."""
    spec, parent = run.spec, run.status.baseModel
    metrics = finite_metrics(summary.metrics)
    tracking = {k: v for k, v in {"url": summary.tracking.url,
                                  "experimentKey": summary.tracking.experimentKey}.items() if v}
    mv_spec = ModelVersionSpec.model_validate({
        "modelName": spec.modelName,
        "version": version,
        "artifact": summary.artifact.model_dump(exclude_none=True,
                                                include={"uri", "digest", "format", "card"}),
        "baseModel": parent.uri if parent else spec.baseModel,
        "parent": parent.model_dump(include={"modelVersion", "version", "digest", "ref"})
        if parent else None,
        "sourceRun": {"name": run.name, "uid": run.uid},
        "dataset": {"train": spec.dataset.train, "eval": spec.dataset.eval,
                    "digests": summary.dataset.digests},
        "metrics": metrics,
        "tracking": tracking or None,
        "comparison": comparison(alias, baseline, metrics)})
    return {
        "apiVersion": API_VERSION, "kind": "ModelVersion",
        "metadata": {
            "name": version_name(spec.modelName, version),
            "labels": {MODEL_LABEL: spec.modelName, RUN_UID_LABEL: run.uid, RUN_LABEL: run.name}},
        "spec": mv_spec.model_dump(exclude_none=True)}


def alias_target(mv: dict, now: str) -> dict:
    return {"version": mv["spec"]["version"], "modelVersion": mv["metadata"]["name"],
            "uri": mv["spec"]["artifact"]["uri"], "digest": mv["spec"]["artifact"]["digest"],
            "updateTime": now}


def own_version(versions: list[dict], run_uid: str) -> dict | None:
    """The ModelVersion a run already registered (a retried registration), if any."""
    return next((v for v in versions
                 if (v["metadata"].get("labels") or {}).get(RUN_UID_LABEL) == run_uid
                 or ((v.get("spec") or {}).get("sourceRun") or {}).get("uid") == run_uid), None)


def next_version(versions: list[dict], taken: set[int] | frozenset[int] = frozenset()) -> int:
    """The next free version number: above every registered one and every number found
    taken (by a concurrent registration or a foreign object of that name)."""
    return max([v["spec"]["version"] for v in versions] + list(taken), default=0) + 1


def allocate_version(run_uid: str, make: Callable[[int], dict], known: Iterable[int],
                     list_own: Callable[[], list[dict]],
                     list_versions: Callable[[], list[dict]],
                     create: Callable[[dict], bool],
                     get: Callable[[str], dict | None]) -> dict:
    """Register a run's ModelVersion under the next free number, at most once, and return it.
    `make(number)` builds the candidate, `known` are the numbers the Model's status records,
    `list_own` lists the run's own versions (a retried registration finds its version there),
    `create` returns False when its name exists, `get` reads an object by name. Registration
    reads no other version (a long history is not listed each time). Only a number found
    taken (the Model's status behind, a concurrent registration, a foreign object of that
    name) lists every version (`list_versions`) to move on past them; after MAX_VERSION_TRIES
    numbers it gives up with an error instead of looping. A namespace being deleted stops it
    through `create`'s exception."""
    versions, numbers = list_own(), set(known)
    taken: set[int] = set()
    for _ in range(MAX_VERSION_TRIES):
        mine = own_version(versions, run_uid)
        if mine is not None:
            return mine
        number = next_version(versions, taken | numbers)
        candidate = make(number)
        if create(candidate):
            return candidate
        existing = get(candidate["metadata"]["name"])
        if existing is not None and own_version([existing], run_uid):
            return existing  # our own create, retried
        taken.add(number)
        versions = list_versions()
    raise RuntimeError(f"no free version number after {MAX_VERSION_TRIES} tries (numbers "
                       f"{min(taken)}..{max(taken)} are taken by other objects)")


def promoted_alias(model: dict) -> str:
    return ((model.get("spec") or {}).get("promotion") or {}).get(
        "alias", Promotion.model_fields["alias"].default)


def recorded_numbers(model: dict) -> list[int]:
    """The version numbers the Model's status records."""
    return [r["version"] for r in ((model.get("status") or {}).get("versions") or [])]


def baseline(model: dict | None, get: Callable[[str], dict | None]) -> dict | None:
    """The ModelVersion the promoted alias points at now (what a candidate is compared with);
    `get` reads a ModelVersion by name."""
    current = (((model or {}).get("status") or {}).get("aliases") or {}).get(
        promoted_alias(model or {}))
    return (current and current.get("modelVersion") and get(current["modelVersion"])) or None


def promoted_summary(model: dict | None, get: Callable[[str], dict | None]) -> dict | None:
    """{name, metrics} of the version the Model's promotion alias points to (the model card
    compares the new version with it); `get` reads a ModelVersion by name."""
    mv = baseline(model, get)
    return {"name": mv["metadata"]["name"], "metrics": mv["spec"].get("metrics", {})} if mv \
        else None


@dataclass
class ModelUpdate:
    """A Model's new status after a registration, and what to tell about it."""

    status: dict
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, msg)
    promoted: str | None = None                                    # the alias it moved
    blocked_gates: list[str] = field(default_factory=list)         # metrics that blocked it


#: How many of the newest versions a Model's status lists (every one is a ModelVersion).
VERSIONS_RECORDED = 100


def record_version(model: dict, mv: dict, base: dict | None, now: str) -> ModelUpdate:
    """Record `mv` in the Model's status, move `latest`, and decide the promoted alias (once
    per version, newest version only), `base` being the version the alias points at now
    (`baseline`): pinned -> not moved; a failed gate -> blocked; else promoted. The status is
    checked against ModelStatus."""
    spec, status = model.get("spec") or {}, copy.deepcopy(model.get("status") or {})
    update, version = ModelUpdate(status), mv["spec"]["version"]
    refs = {r["version"]: r for r in status.get("versions", [])}
    refs.setdefault(version, {"version": version, "name": mv["metadata"]["name"],
                              "digest": mv["spec"]["artifact"]["digest"], "created": now})
    # The newest only: the status is read and written whole at each registration, and a
    # Model of an hourly schedule would otherwise reach etcd's object size limit in months.
    # The next number comes from the newest recorded; the aliases carry their own targets.
    status["versions"] = [refs[v] for v in sorted(refs)[-VERSIONS_RECORDED:]]
    aliases = status.setdefault("aliases", {})
    if aliases.get("latest", {}).get("version", 0) < version:
        aliases["latest"] = alias_target(mv, now)
    promotion = spec.get("promotion")
    decided = any(c["type"] == "Promoted" and c.get("message", "").startswith(
        f"version {version}:") for c in status.get("conditions", []))
    if not promotion or version != max(refs) or decided:
        checked(ModelStatus, status)
        return update
    alias, generation = promoted_alias(model), model["metadata"].get("generation", 1)
    failures = failed_gates(promotion, mv["spec"].get("metrics") or {},
                            base["spec"].get("metrics") if base else None)
    if alias in (spec.get("pinnedAliases") or {}):
        set_condition(status, "Promoted", False, "AliasPinned",
                      f"version {version}: {alias} is pinned by spec.pinnedAliases", now,
                      generation)
    elif failures:
        set_condition(status, "Promoted", False, "GatesFailed",
                      f"version {version}: not promoted to {alias}: " + "; ".join(failures),
                      now, generation)
        update.blocked_gates = [f.split("=")[0].split(" ")[0] for f in failures]
        update.events.append(("Warning", "PromotionBlocked", f"version {version} not promoted "
                              f"to {alias}: " + "; ".join(failures)))
    else:
        aliases[alias] = alias_target(mv, now)
        set_condition(status, "Promoted", True, "GatesPassed",
                      f"version {version}: promoted to {alias}", now, generation)
        update.promoted = alias
        update.events.append(("Normal", "Promoted", f"version {version} promoted to {alias}"))
    checked(ModelStatus, status)
    return update


def pins_to_move(model: dict) -> dict[str, int]:
    """Pinned aliases (spec.pinnedAliases) that do not yet point at their pinned version."""
    aliases = ((model.get("status") or {}).get("aliases") or {})
    return {alias: version
            for alias, version in ((model.get("spec") or {}).get("pinnedAliases") or {}).items()
            if aliases.get(alias, {}).get("version") != version}


def pin_aliases(model: dict, pinned: dict[str, dict | None], now: str) -> ModelUpdate:
    """Point pinned aliases at their versions. `pinned`: alias -> the pinned version's
    ModelVersion (None: it does not exist), for the aliases `pins_to_move` names."""
    update, moved = ModelUpdate(copy.deepcopy(model.get("status") or {})), []
    for alias, mv in pinned.items():
        version = model["spec"]["pinnedAliases"][alias]
        if mv is None:
            update.events.append(("Warning", "PinUnknownVersion",
                                  f"{alias} is pinned to version {version}, which does not exist"))
            continue
        update.status.setdefault("aliases", {})[alias] = alias_target(mv, now)
        moved.append(f"{alias} -> version {version} (pinned)")
    if moved:
        update.events.append(("Normal", "AliasPinned", "; ".join(moved)))
    checked(ModelStatus, update.status)
    return update


def failed_gates(promotion: dict, candidate: dict[str, float],
                 baseline: dict[str, float] | None) -> list[str]:
    """Every gate the candidate fails, in words; empty means promote."""
    failures = []
    for gate in promotion.get("gates") or []:
        metric, value = gate["metric"], candidate.get(gate["metric"])
        if value is None:
            failures.append(f"{metric} is missing (the gate needs it)")
        elif gate.get("min") is not None and value < gate["min"]:
            failures.append(f"{metric}={value:.4g} < min {gate['min']:g}")
        elif gate.get("max") is not None and value > gate["max"]:
            failures.append(f"{metric}={value:.4g} > max {gate['max']:g}")
    no_regression = promotion.get("noRegression") or {}
    tolerance = no_regression.get("tolerance", 0.0)
    for metric in no_regression.get("metrics") or [] if baseline else []:
        new, old = candidate.get(metric), baseline.get(metric)
        if old is None:
            continue
        if new is None:
            failures.append(f"{metric} is missing (noRegression needs it)")
            continue
        worse = (new - old) if better_lower(metric) else (old - new)
        if worse > tolerance:
            failures.append(f"{metric} regressed: {new:.4g} vs {old:.4g} (tolerance {tolerance:g})")
    return failures


def serving_patch(container: str, uri: str, digest: str) -> dict:
    """Strategic merge patch that points a Deployment's container at a model."""
    return {"spec": {"template": {
        "metadata": {"annotations": {DIGEST_ANNOTATION: digest, URI_ANNOTATION: uri}},
        "spec": {"containers": [{"name": container, "env": [{"name": URI_ENV, "value": uri}]}]}}}}


def isvc_patch(uri: str, digest: str) -> dict:
    """JSON merge patch that points a KServe InferenceService at a model: its predictor's
    storageUri and the digest annotation, nothing else."""
    return {"metadata": {"annotations": {DIGEST_ANNOTATION: digest}},
            "spec": {"predictor": {"model": {"storageUri": uri}}}}


def isvc_current(isvc: dict) -> tuple[str | None, str | None]:
    """The (uri, digest) an InferenceService currently serves."""
    model = ((isvc.get("spec") or {}).get("predictor") or {}).get("model") or {}
    return model.get("storageUri"), (isvc["metadata"].get("annotations") or {}).get(
        DIGEST_ANNOTATION)


def serving_current(deployment: dict, container: str) -> tuple[str | None, str | None]:
    """The (uri, digest) a Deployment's template currently serves."""
    template = deployment["spec"]["template"]
    digest = ((template.get("metadata") or {}).get("annotations") or {}).get(DIGEST_ANNOTATION)
    for c in template["spec"]["containers"]:
        if c["name"] == container:
            uri = next((e.get("value") for e in c.get("env") or [] if e["name"] == URI_ENV), None)
            return uri, digest
    return None, digest
