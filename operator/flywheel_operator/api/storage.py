"""Where a run's pods get storage credentials and endpoints: `FineTuneRun.spec.storage`, over
the operator config's `storage` defaults (a platform team sets the store once; run manifests
stay short). Only names of Secrets and ServiceAccounts: never a secret value.
"""

from __future__ import annotations

from typing import Annotated

from flywheel_trainer.config import SecretKeyRef, SpecModel
from pydantic import Field

from .common import DNS_SUBDOMAIN_RE, NO_QUERY_RULE, NO_SECRET_RULE, cel

__all__ = ["S3_SECRET_KEYS", "GcsStorage", "HfStorage", "S3Storage", "Storage", "merge_storage"]

#: The keys of `s3.credentialsSecret`, each passed as the variable of the same name.
S3_SECRET_KEYS = {"AWS_ACCESS_KEY_ID": False, "AWS_SECRET_ACCESS_KEY": False,
                  "AWS_SESSION_TOKEN": True}  # name -> optional
#: An http(s) URL with a host and no user:password@, query or fragment.
ENDPOINT_RE = r"^https?://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[^?#@\s]*)?$"

ObjectName = Annotated[str, Field(min_length=1, max_length=253, pattern=DNS_SUBDOMAIN_RE)]


class S3Storage(SpecModel):
    """S3 and S3-compatible stores (MinIO, Ceph, versitygw, ...)."""

    endpoint: str | None = Field(
        default=None, max_length=512, pattern=ENDPOINT_RE,
        description="S3-compatible endpoint URL, e.g. https://minio.storage:9000 (the pods' "
        "AWS_ENDPOINT_URL_S3; path-style addressing). Empty: AWS.",
        json_schema_extra=cel(NO_QUERY_RULE, NO_SECRET_RULE))
    region: str | None = Field(
        default=None, max_length=64, pattern=r"^[a-z0-9-]+$",
        description="Region (the pods' AWS_REGION), e.g. us-east-1.")
    credentialsSecret: ObjectName | None = Field(
        default=None,
        description="Secret in the run's namespace whose keys AWS_ACCESS_KEY_ID and "
        "AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN) become the pods' variables "
        "of the same names. Empty: the pods' own identity (serviceAccountName for IRSA, or "
        "the node's instance role).")


class GcsStorage(SpecModel):
    """Google Cloud Storage."""

    keySecretRef: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a service account key file (JSON): mounted read-only, "
        "GOOGLE_APPLICATION_CREDENTIALS names it. Empty: GKE Workload Identity "
        "(serviceAccountName).")


class HfStorage(SpecModel):
    """The Hugging Face Hub (hf:// base models)."""

    tokenSecretRef: SecretKeyRef | None = Field(
        default=None,
        description="Secret key holding a Hub token (gated models such as Llama or Mistral): "
        "the pods' HF_TOKEN, resolved by the kubelet. Empty: anonymous downloads.")


class Storage(SpecModel):
    """Credentials and endpoints for the run's s3:// and gs:// URIs (pvc:// claims are mounted
    from the URIs themselves). Unset fields fall back to the operator config's `storage`."""

    s3: S3Storage | None = Field(default=None, description="S3 and S3-compatible stores.")
    gcs: GcsStorage | None = Field(default=None, description="Google Cloud Storage.")
    hf: HfStorage | None = Field(default=None, description="The Hugging Face Hub.")
    serviceAccountName: ObjectName | None = Field(
        default=None,
        description="ServiceAccount the trainer and preflight pods run as, for workload "
        "identity (IRSA, GKE Workload Identity): no key at all.")


def merge_storage(run: Storage | None, defaults: Storage | None) -> Storage:
    """The run's storage settings over the defaults, field by field."""

    def deep(base: dict, over: dict) -> dict:
        out = dict(base)
        for key, value in over.items():
            out[key] = deep(out[key], value) if isinstance(value, dict) and isinstance(
                out.get(key), dict) else value
        return out

    base = defaults.model_dump(exclude_none=True) if defaults else {}
    over = run.model_dump(exclude_none=True) if run else {}
    return Storage.model_validate(deep(base, over))
