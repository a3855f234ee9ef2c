"""Pure: what a run's storage settings give its trainer and preflight pods. The run's
`spec.storage` over the operator config's defaults becomes env, Secret references, volumes,
mounts and a ServiceAccount; every pvc:// claim a URI names is mounted (read-only where the
run only reads it). Secrets are only named (secretKeyRef, secret volume), never read.
"""

from __future__ import annotations

from typing import Any

from flywheel_trainer.contract import Env

from .api import S3_SECRET_KEYS, FineTuneRunSpec, merge_storage
from .config import OperatorConfig

PVC_ROOT = "/pvc"  # the trainer's $FLYWHEEL_PVC_ROOT: claim C is mounted at /pvc/C
GCS_KEY_DIR = "/var/run/secrets/flywheel/gcs"


def _env(name: str, value: Any) -> dict[str, Any]:
    return {"name": name, "value": str(value)}


def claims(spec: FineTuneRunSpec) -> dict[str, bool]:
    """Every PersistentVolumeClaim a pvc:// URI of the run names -> read-only (the run only
    reads from it: base model and datasets, never output or checkpoints)."""
    uris = [(spec.baseModel, True), (spec.dataset.train, True), (spec.dataset.eval, True),
            (spec.output.uri, False), (spec.checkpoint.uri, False)]
    out: dict[str, bool] = {}
    for uri, read_only in uris:
        if uri and uri.startswith("pvc://"):
            claim = uri[len("pvc://"):].split("/", 1)[0]
            out[claim] = out.get(claim, True) and read_only
    return dict(sorted(out.items()))


def storage_wiring(spec: FineTuneRunSpec, config: OperatorConfig) -> dict[str, Any]:
    """Env, volumes, mounts and ServiceAccount that give the trainer and preflight pods the
    run's storage: the run's `spec.storage` over the operator config's defaults, plus a mount
    per pvc:// claim. Secrets are only named (secretKeyRef, secret volume), never read."""
    st = merge_storage(spec.storage, config.storage)
    env: list[dict[str, Any]] = []
    volumes: list[dict[str, Any]] = []
    mounts: list[dict[str, Any]] = []
    if st.s3:
        if st.s3.endpoint:
            env.append(_env("AWS_ENDPOINT_URL_S3", st.s3.endpoint))
        if st.s3.region:
            env.append(_env("AWS_REGION", st.s3.region))
        if st.s3.credentialsSecret:
            env += [{"name": key, "valueFrom": {"secretKeyRef": {
                "name": st.s3.credentialsSecret, "key": key,
                **({"optional": True} if optional else {})}}}
                for key, optional in S3_SECRET_KEYS.items()]
    if st.hf and st.hf.tokenSecretRef:
        env.append({"name": Env.HF_TOKEN, "valueFrom": {"secretKeyRef": {
            "name": st.hf.tokenSecretRef.name, "key": st.hf.tokenSecretRef.key}}})
    if st.gcs and st.gcs.keySecretRef:
        ref = st.gcs.keySecretRef
        volumes.append({"name": "gcs-key", "secret": {
            "secretName": ref.name, "items": [{"key": ref.key, "path": "key.json"}],
            "defaultMode": 0o440}})
        mounts.append({"name": "gcs-key", "mountPath": GCS_KEY_DIR, "readOnly": True})
        env.append(_env("GOOGLE_APPLICATION_CREDENTIALS", f"{GCS_KEY_DIR}/key.json"))
    named = claims(spec)
    if named:
        env.append(_env(Env.PVC_ROOT, PVC_ROOT))
    for i, (claim, read_only) in enumerate(named.items()):
        volumes.append({"name": f"pvc-{i}", "persistentVolumeClaim": {
            "claimName": claim, **({"readOnly": True} if read_only else {})}})
        mounts.append({"name": f"pvc-{i}", "mountPath": f"{PVC_ROOT}/{claim}",
                       **({"readOnly": True} if read_only else {})})
    return {"env": env, "volumes": volumes, "mounts": mounts,
            "serviceAccountName": st.serviceAccountName}
