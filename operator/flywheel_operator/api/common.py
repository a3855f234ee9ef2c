"""Shared API building blocks: CEL rules for URIs and secrets, constrained string types,
`Condition`, `Toleration`, and `checked` (status dicts validated against their model)."""

from __future__ import annotations

from typing import Annotated, Any, Literal, TypeVar

from flywheel_trainer.config import SpecModel
from pydantic import BaseModel, ConfigDict, Field

from .. import vocab

# --------------------------------------------------------------------------------------------
# CEL building blocks. Regexes are RE2 (what CEL's matches() uses) and also valid Python `re`.

#: Storage URIs for data and outputs: s3://bucket/..., gs://bucket/..., file:///abs, pvc://claim/path.
#: Bucket and claim names exclude `@` and `:`, so `user:pass@` credentials cannot match.
DATA_URI_RE = (
    r"^((s3|gs)://[a-z0-9][a-z0-9._-]{1,62}(/[^?#]*)?"
    r"|file:///[^?#]*"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^?#]+)$"
)
#: Base model URIs: the data schemes, hf://[org/]name[@revision] and registry references
#: model://MODEL@ALIAS or model://MODEL/VERSION (a Model of the run's namespace).
MODEL_URI_RE = (
    r"^(model://[a-z0-9]([-a-z0-9]*[a-z0-9])?(@[a-z0-9]([-a-z0-9]*[a-z0-9])?|/[1-9][0-9]{0,8})"
    r"|hf://([A-Za-z0-9][A-Za-z0-9._-]*/)?[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9][A-Za-z0-9._/-]*)?"
    r"|(s3|gs)://[a-z0-9][a-z0-9._-]{1,62}(/[^?#]*)?"
    r"|file:///[^?#]*"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?/[^?#]+)$"
)
#: Well-known credential shapes anywhere in a string (case-insensitive).
SECRET_RE = (
    r"(?i)(sk-[a-z0-9_-]{16,}|gh[pousr]_[a-z0-9]{20,}|github_pat_|hf_[a-z0-9]{20,}"
    r"|akia[0-9a-z]{16}|xox[abprs]-|-----begin|eyj[a-z0-9_-]{8,}\.[a-z0-9_-]{8,}"
    r"|(api[_-]?key|secret|passw(or)?d|token|x-amz-signature|x-goog-signature|sig)\s*[=:])")
#: A bare opaque token: 20+ letters and digits with upper case, lower case and digits mixed.
TOKEN_RE = r"^[A-Za-z0-9]{20,}$"

NO_SECRET_RULE = {
    "rule": (
        f"!self.matches(r'{SECRET_RE}') && !(self.matches(r'{TOKEN_RE}') && "
        "self.matches(r'[A-Z]') && self.matches(r'[a-z]') && self.matches(r'[0-9]'))"),
    "message": "must not hold a secret value (API key, token, password): "
    "reference a Secret (e.g. tracking.comet.apiKeySecretRef) instead"}
NO_QUERY_RULE = {
    "rule": "!self.contains('?') && !self.contains('#')",
    "message": "must not carry a query string or fragment: presigned URLs and tokens are "
    "secrets; give the pods storage credentials instead"}


#: pvc://CLAIM/path: CLAIM is the name of a PersistentVolumeClaim in the run's namespace.
PVC_CLAIM_RULE = {
    "rule": "!self.startsWith('pvc://') || "
    "self.matches(r'^pvc://[a-z0-9]([-a-z0-9]{0,251}[a-z0-9])?/[^/?#]')",
    "message": "pvc://CLAIM/path: CLAIM must name a PersistentVolumeClaim (lowercase letters, "
    "digits and '-', at most 253, starting and ending alphanumeric) and a path must follow"}


def uri_rules(kind: Literal["data", "model"]) -> list[dict[str, str]]:
    """CEL rules for a URI field: scheme, pvc claim name, no query string, no secret."""
    if kind == "model":
        scheme = {
            "rule": f"self.matches(r'{MODEL_URI_RE}')",
            "message": "must be model://MODEL@ALIAS, model://MODEL/VERSION, "
            "hf://[org/]name[@revision], s3://bucket/path, gs://bucket/path, file:///path or "
            "pvc://claim/path"}
    else:
        scheme = {
            "rule": f"self.matches(r'{DATA_URI_RE}')",
            "message": "must be s3://bucket/path, gs://bucket/path, file:///path or "
            "pvc://claim/path (no credentials)"}
    return [scheme, PVC_CLAIM_RULE, NO_QUERY_RULE, NO_SECRET_RULE]


def cel(*rules: dict[str, str]) -> dict[str, Any]:
    """json_schema_extra carrying CEL rules."""
    return {"x-kubernetes-validations": list(rules)}


URI_MAX = 2048
DNS_LABEL_RE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
DNS_SUBDOMAIN_RE = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"
LABEL_VALUE_RE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
METRIC_RE = r"^[A-Za-z0-9_][A-Za-z0-9_./:-]*$"

DnsLabel = Annotated[str, Field(min_length=1, max_length=63, pattern=DNS_LABEL_RE)]
FreeText = Annotated[str, Field(max_length=256, json_schema_extra=cel(NO_SECRET_RULE))]
LabelValue = Annotated[
    str, Field(max_length=63, pattern=LABEL_VALUE_RE, json_schema_extra=cel(NO_SECRET_RULE))]
LabelKey = Annotated[
    str,
    Field(
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9.]*[a-z0-9])?/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$",
        json_schema_extra=cel(NO_SECRET_RULE))]
MetricName = Annotated[str, Field(min_length=1, max_length=256, pattern=METRIC_RE)]
Timestamp = Annotated[str, Field(json_schema_extra={"format": "date-time"})]
StatusText = Annotated[str, Field(max_length=32768)]

# --------------------------------------------------------------------------------------------
# Shared


class Condition(BaseModel):
    """A standard condition (as metav1.Condition): `kubectl wait --for=condition=<type>`."""

    model_config = ConfigDict(extra="forbid")

    type: str = Field(max_length=316, description="Condition type, e.g. Succeeded, Running.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str | None = Field(
        default=None, max_length=1024, description="CamelCase reason for the last transition.")
    message: str | None = Field(
        default=None, max_length=32768, description="Human-readable detail.")
    lastTransitionTime: Timestamp | None = Field(
        default=None, description="When the status last changed.")
    observedGeneration: int | None = Field(
        default=None, ge=0, description="metadata.generation the condition was computed for.")


CONDITIONS_SCHEMA = {"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]}


def set_condition(status: Any, type_: str, value: bool, reason: str, message: str, now: str,
                  generation: int | None) -> None:
    """vocab.set_condition on a status model's typed `conditions` (assigned, so the status
    document carries them)."""
    rows = {"conditions": [c.model_dump(exclude_none=True) for c in status.conditions]}
    vocab.set_condition(rows, type_, value, reason, message, now, generation)
    status.conditions = [Condition(**c) for c in rows["conditions"]]


def has_condition(conditions: list[Condition], type_: str, status: str = "True",
                  reason: str | None = None) -> bool:
    """Whether a condition of `type_` has `status` (and `reason`, when given)."""
    return any(c.type == type_ and c.status == status and reason in (None, c.reason)
               for c in conditions)


def conditions_field() -> Any:
    return Field(default_factory=list, max_length=64,
                 description="Standard conditions (type/status/reason/message/lastTransitionTime).",
                 json_schema_extra=CONDITIONS_SCHEMA)


class Toleration(SpecModel):
    """A pod toleration (the subset Flywheel passes through)."""

    key: LabelKey | None = Field(default=None, description="Taint key; empty matches all.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: LabelValue | None = Field(default=None, description="Taint value (for Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects.")
    tolerationSeconds: int | None = Field(
        default=None, ge=0, description="For NoExecute: how long the pod stays bound.")


Status = TypeVar("Status", bound=dict)


def checked(model: type[BaseModel], status: Status) -> Status:
    """`status` unchanged once it validates against `model` (a misspelt key fails loudly)."""
    model.model_validate(status)
    return status
