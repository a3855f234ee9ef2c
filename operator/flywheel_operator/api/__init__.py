"""The Flywheel API (`flywheel.dev/v1alpha1`): pydantic models, the single source of truth.

One module per kind of API: `run` (FineTuneRun), `model` (ModelVersion and Model), `schedule`
(FineTuneSchedule), over `common` (CEL rules, string types, Condition). `crdgen` turns the
models into CRDs; field names are the public API (camelCase, as written in manifests). CEL
rules are plain data (`x-kubernetes-validations` entries), unit-tested and copied verbatim.
Everything is re-exported here: `api.FineTuneRun`, `api.DATA_URI_RE`, ...
"""

from ..vocab import API_VERSION, GROUP, VERSION, RunPhase  # noqa: F401
from .common import *  # noqa: F403
from .model import *  # noqa: F403
from .run import *  # noqa: F403
from .schedule import *  # noqa: F403
