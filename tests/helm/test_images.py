"""Static checks of the Dockerfiles (no Docker engine here): pinned, multi-stage, non-root,
torch-free operator, and users that match what the chart and the operator run them as."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib

import pytest
import yaml

from .support import CHART, ROOT

IMAGES = ROOT / "images"


def dockerfile(name: str) -> str:
    return (IMAGES / f"{name}.Dockerfile").read_text()


def instructions(text: str) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    joined = re.sub(r"\\\n", " ", "\n".join(
        line for line in text.splitlines() if not line.lstrip().startswith("#")))
    return [(m.group(1).upper(), m.group(2).strip())
            for m in re.finditer(r"^\s*([A-Za-z]+)\s+(.*)$", joined, re.M)]


def final_stage(text: str) -> list[tuple[str, str]]:
    steps = instructions(text)
    last_from = max(i for i, (op, _) in enumerate(steps) if op == "FROM")
    return steps[last_from:]


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_multi_stage_pinned_and_locked(name):
    text = dockerfile(name)
    steps = instructions(text)
    base = dict(s.split("=", 1) for op, s in steps if op == "ARG" and "=" in s)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim-[a-z]+(@sha256:[0-9a-f]{64})?", base), base
    froms = [s for op, s in steps if op == "FROM"]
    assert froms == ["${PYTHON_IMAGE} AS builder", "${PYTHON_IMAGE}"]
    install = " ".join(s for op, s in steps if op == "RUN" and "pip install" in s)
    assert "-c requirements.lock" in install and "--only-binary=:all:" in install
    final = final_stage(text)
    assert ("COPY", "--from=builder /opt/flywheel /opt/flywheel") in final
    assert not any(op == "COPY" and "--from" not in s for op, s in final)  # no sources
    assert not any(op == "ADD" for op, _ in steps)


def test_operator_image_runs_as_the_charts_user_with_the_operator_entrypoint():
    final = final_stage(dockerfile("operator"))
    user = [s for op, s in final if op == "USER"]
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert user == [f"{values['runAsUser']}:{values['runAsUser']}"]
    assert ("ENTRYPOINT", '["python", "-m", "flywheel_operator"]') in final
    install = [s for op, s in instructions(dockerfile("operator")) if op == "RUN"
               and "pip install" in s][0]
    assert "[trainer]" not in install  # base dependencies only


def test_trainer_image_runs_as_the_uid_of_trainer_pods():
    from flywheel_operator import render

    final = final_stage(dockerfile("trainer"))
    assert [s for op, s in final if op == "USER"] == [f"{render.RUN_AS}:{render.RUN_AS}"]
    assert not any(op == "ENTRYPOINT" for op, _ in final)  # the pod's command is torchrun
    install = [s for op, s in instructions(dockerfile("trainer")) if op == "RUN"
               and "pip install" in s][0]
    assert "[trainer]" in install


@pytest.mark.parametrize("name", ["operator", "trainer"])
def test_build_context_has_what_the_build_copies(name):
    ignore = (IMAGES / f"{name}.Dockerfile.dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1:][:5] == [
        "!pyproject.toml", "!requirements.lock", "!README.md", "!operator/flywheel_operator/",
        "!trainer/flywheel_trainer/"]
    copied = [s.split()[0] for op, s in instructions(dockerfile(name))
              if op == "COPY" and "--from" not in s]
    assert copied == ["pyproject.toml", "operator/flywheel_operator/",
                      "trainer/flywheel_trainer/"]
    readme = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["readme"]
    assert readme == "README.md"


def test_lock_pins_every_dependency_and_the_operator_needs_no_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lock = {m.group(1).lower(): m.group(2) for m in
            re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)", (ROOT / "requirements.lock").read_text(),
                        re.M)}
    for requirement in project["dependencies"] + project["optional-dependencies"]["trainer"]:
        name, version = requirement.split("==")
        assert lock.get(name.lower()) == version, requirement
    assert not any(r.startswith("torch") for r in project["dependencies"])
    # The operator (handlers, rendering, registry) imports without torch or transformers.
    code = ("import sys; sys.modules.update(torch=None, transformers=None, comet_ml=None); "
            "import flywheel_operator.handlers, flywheel_operator.__main__")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=60)
    assert proc.returncode == 0, proc.stderr
