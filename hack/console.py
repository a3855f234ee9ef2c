"""What `make run` prints: its headlines, the live progress bar of a run and the table of
what a version learned."""

from __future__ import annotations

import sys
import time
from datetime import UTC, datetime


def say(msg: str) -> None:
    print(f"\033[1m==> {msg}\033[0m", flush=True)


def follow(get, name: str, namespace: str, timeout: float = 1800) -> dict:
    """Print the run's progress until it ends (`get`: kubectl get -o json); its status."""
    say(f"following FineTuneRun {namespace}/{name} (Ctrl-C stops watching, not the run)")
    last, deadline, tty = None, time.monotonic() + timeout, sys.stdout.isatty()
    logged = (-1, 0.0)  # without a terminal: the bar's last printed tenth and time
    while time.monotonic() < deadline:
        status = get("ftr", name, "-n", namespace).get("status") or {}
        progress = status.get("progress") or {}
        pre = (status.get("preflight") or {}).get("phase")
        if status.get("phase") == "Running" and progress.get("totalSteps"):
            # the live bar: stage, step/total, loss, tokens/s, ETA (status.progress)
            done = progress.get("step", 0) / progress["totalSteps"]
            line = (f"[{'#' * int(24 * done):.<24}] {progress.get('percent', '')} "
                    f"attempt {status.get('attempt')} {progress.get('stage', '')} step "
                    f"{progress.get('step')}/{progress['totalSteps']}"
                    + (f" loss {progress['loss']:.3f}" if progress.get("loss") else "")
                    + (f" {progress['tokensPerSecond']:.0f} tok/s"
                       if progress.get("tokensPerSecond") else "")
                    + (f" ETA {progress['eta'][11:19]}" if progress.get("eta") else ""))
        else:
            line = (f"phase={status.get('phase', '-'):<10} attempt={status.get('attempt', '-')}"
                    + (f" preflight={pre}" if pre else "")
                    + (f" step={progress.get('step')}/{progress.get('totalSteps')}"
                       if progress.get("step") is not None and progress.get("totalSteps")
                       else "")
                    + (f"  {status['message']}" if status.get("message") else ""))
        if line != last and line.startswith("[") and not tty:
            # piped to a file: a bar line every tenth of the way or every 30 s, not every second
            tenth = int(10 * progress.get("step", 0) / progress["totalSteps"])
            if tenth == logged[0] and time.monotonic() - logged[1] < 30:
                line = last
            else:
                logged = (tenth, time.monotonic())
        if line != last:
            bar = line.startswith("[") and tty  # redraw the bar in place on a terminal
            if tty and not bar and (last or "").startswith("["):
                print()
            print(f"\r  {datetime.now(UTC):%H:%M:%S}  {line:<100}" if bar
                  else f"  {datetime.now(UTC):%H:%M:%S}  {line}", end="" if bar else "\n",
                  flush=True)
            last = line
        if status.get("phase") in ("Succeeded", "Failed"):
            return status
        time.sleep(1)
    raise SystemExit(f"run {name} did not finish within {timeout:.0f}s")


def metrics_table(metrics: dict, deltas: dict | None, categories: tuple[str, ...]) -> str:
    """Tool-call accuracy and eval loss per category, with ▲/▼ deltas against production."""
    def cell(key: str) -> str:
        value = metrics.get(key)
        text = "-" if value is None else f"{value:.3f}"
        delta = (deltas or {}).get(key)
        if delta is not None:
            better = delta < 0 if "loss" in key else delta > 0
            mark = "=" if abs(delta) < 5e-4 else ("▲" if better else "▼")
            text += f" {mark}{delta:+.3f}"
        return text

    rows = [("category", "tool-call accuracy", "eval loss")]
    for cat in ("all", *categories):
        suffix = "" if cat == "all" else f"/{cat}"
        rows.append((cat, cell("tool_call_accuracy" + suffix), cell("eval_loss" + suffix)))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True))
                     for r in rows)
