"""Comet tracking (rank 0 only) and the run summary (the pod's termination message).

Comet: the experiment key comes from `FLYWHEEL_EXPERIMENT_KEY` (stable across attempts, so a
restart appends to the same experiment) and the API key only from `COMET_API_KEY`. Without a
key, or when the Comet host does not answer a TCP connect within a few seconds, the trainer logs
to an offline archive instead of letting an online experiment hang for ~30 s and then drop
everything. The archive goes to `COMET_OFFLINE_DIRECTORY`, else `<output.uri>/comet-offline/`
for local outputs (for remote outputs it is written locally and copied there at the end).
Upload it with `comet upload <archive.zip>`; archives use mode get_or_create, so uploading the
archives of several attempts appends them to the one experiment.
"""

from __future__ import annotations

import logging
import os
import socket
import tempfile
import time
from urllib.parse import urlparse

from .contract import TERMINATION_LOG, Env, write_message

log = logging.getLogger("flywheel.tracking")
DEFAULT_COMET_URL = "https://www.comet.com/clientlib/"


def experiment_key(configured: str | None) -> str | None:
    return os.environ.get(Env.EXPERIMENT_KEY) or configured


def comet_reachable(timeout: float = 3.0) -> bool:
    url = os.environ.get("COMET_URL_OVERRIDE") or DEFAULT_COMET_URL
    u = urlparse(url)
    try:
        with socket.create_connection(
            (u.hostname, u.port or (443 if u.scheme == "https" else 80)), timeout=timeout
        ):
            return True
    except OSError:
        return False


def _offline_dir(output_uri: str) -> tuple[str, str | None]:
    """(local archive directory, remote directory to copy it to at the end or None)."""
    from . import storage

    if os.environ.get("COMET_OFFLINE_DIRECTORY"):
        return os.environ["COMET_OFFLINE_DIRECTORY"], None
    local = storage.local_path(output_uri)
    if local is not None:
        return os.path.join(local.rstrip("/"), "comet-offline"), None
    return tempfile.mkdtemp(prefix="comet-offline-"), storage.join(output_uri, "comet-offline")


class Tracker:
    """Comet on rank 0; a no-op elsewhere and when tracking.comet is not configured."""

    def __init__(self, cfg, is_main: bool):
        self.exp = None
        self.online = False
        self.url: str | None = None
        self.key = experiment_key(cfg.experimentKey)
        self.remote_offline: str | None = None
        self.offline_dir: str | None = None
        self._t0 = time.time() - 1
        comet = cfg.tracking.comet
        if not is_main or comet is None:
            return
        # comet's own error reporting (sentry) would try the network from inside the run
        os.environ.setdefault("COMET_ERROR_TRACKING_ENABLE", "false")
        import comet_ml
        from comet_ml import ExperimentConfig

        api_key = os.environ.get(Env.COMET_API_KEY)
        workspace = os.environ.get(Env.COMET_WORKSPACE) or comet.workspace
        project = os.environ.get(Env.COMET_PROJECT) or comet.project
        name = os.environ.get(Env.RUN_NAME) or cfg.runName
        quiet = dict(
            auto_metric_logging=False, auto_param_logging=False, auto_output_logging=False,
            log_code=False, log_graph=False, log_git_metadata=False, log_git_patch=False,
            log_env_details=False, log_env_gpu=False, log_env_host=False, log_env_cpu=False,
            log_env_network=False, log_env_disk=False, parse_args=False,
            display_summary_level=0, name=name,
        )
        # offline archives (ours, or the SDK's own fallback when an online run loses the
        # connection) go beside the outputs
        self.offline_dir, self.remote_offline = _offline_dir(cfg.output.uri)
        os.makedirs(self.offline_dir, exist_ok=True)
        os.environ["COMET_OFFLINE_DIRECTORY"] = self.offline_dir
        if api_key and comet_reachable():
            try:
                self.exp = comet_ml.start(
                    api_key=api_key, workspace=workspace, project_name=project,
                    experiment_key=self.key, mode="get_or_create", online=True,
                    experiment_config=ExperimentConfig(offline_directory=self.offline_dir,
                                                       **quiet),
                )
                self.online = True
                self.url = self.exp.url
            except Exception as e:  # noqa: BLE001 - any failure means: go offline
                log.warning("Comet online start failed (%s); logging offline", e)
        elif api_key:
            log.warning("Comet is unreachable; logging to an offline archive")
        if self.exp is None:
            self.exp = comet_ml.start(
                workspace=workspace, project_name=project, experiment_key=self.key,
                mode="get_or_create", online=False,
                experiment_config=ExperimentConfig(offline_directory=self.offline_dir, **quiet),
            )
        self.key = self.key or self.exp.get_key()
        attempt = os.environ.get(Env.ATTEMPT) or cfg.attempt or 0
        self.exp.add_tags([f"attempt-{attempt}"])

    def log_params(self, params: dict) -> None:
        if self.exp:
            self.exp.log_parameters(params)

    def log_metrics(self, metrics: dict, step: int) -> None:
        if self.exp:
            self.exp.log_metrics({k: v for k, v in metrics.items() if v is not None}, step=step)

    def log_other(self, key: str, value) -> None:
        if self.exp:
            self.exp.log_other(key, value)

    def log_data_report(self, report: dict) -> None:
        if self.exp:
            self.exp.log_asset_data(report, name="data_report.json")
            self.exp.log_others({f"data/{k}": v for k, v in _flatten(report).items()})

    def end(self) -> str | None:
        """Finish; returns the offline archive path when this attempt wrote one."""
        if not self.exp:
            return None
        started = self._t0
        self.exp.end()
        self.exp = None
        archives = sorted(
            (os.path.join(self.offline_dir, f) for f in os.listdir(self.offline_dir)
             if f.startswith(str(self.key)) and f.endswith(".zip")
             and os.path.getmtime(os.path.join(self.offline_dir, f)) >= started),
            key=os.path.getmtime)
        if not archives:
            return None
        out = []
        for archive in archives:
            if self.remote_offline:
                from . import storage

                remote = storage.join(self.remote_offline, os.path.basename(archive))
                storage.put_file(archive, remote)
                archive = remote
            log.warning("Comet offline archive: %s - upload it with: comet upload %s",
                        archive, archive)
            out.append(archive)
        return out[-1]


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "/"))
        elif isinstance(v, int | float | str | bool) or v is None:
            out[key] = v
    return out


def write_summary(summary: dict) -> str:
    """Rank 0's summary into the termination message (contract.fit: at most 4 KiB)."""
    return write_message(summary, os.environ.get(Env.SUMMARY_PATH, TERMINATION_LOG))
