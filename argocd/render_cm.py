"""Render argocd-cm.yaml (the Argo CD health-check snippet) from the Lua files in health/.

    python argocd/render_cm.py          # rewrite argocd/argocd-cm.yaml
    python argocd/render_cm.py --check  # exit 1 when it is out of date

tests/helm/test_argocd_health.py fails when the snippet and the .lua files disagree.
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
HEALTH = HERE / "health"
OUT = HERE / "argocd-cm.yaml"
KEY = "resource.customizations.health.{}"

HEADER = """\
# Argo CD health checks for Flywheel's custom resources, in argocd-cm form.
# Generated from argocd/health/*.lua by argocd/render_cm.py: edit the .lua files, then rerun it.
# Merge into your argocd-cm (see docs/operations.md), e.g.:
#   kubectl -n argocd patch configmap argocd-cm --type merge --patch-file argocd/argocd-cm.yaml
apiVersion: v1
kind: ConfigMap
metadata:
  name: argocd-cm
  namespace: argocd
  labels:
    app.kubernetes.io/name: argocd-cm
    app.kubernetes.io/part-of: argocd
data:
"""


def render() -> str:
    parts = [HEADER]
    for path in sorted(HEALTH.glob("*.lua")):
        parts.append(f"  {KEY.format(path.stem)}: |\n")
        for line in path.read_text().splitlines():
            parts.append(f"    {line}\n" if line else "\n")
    return "".join(parts)


def main(argv: list[str]) -> int:
    text = render()
    if "--check" in argv:
        if OUT.read_text() != text:
            print(f"{OUT} is out of date: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
