"""The model card: `README.md` in the Hugging Face model-card format, and `training.png` beside it.

The card is written into the artifact directory with the weights (so the artifact digest covers
it). It is a `huggingface_hub.ModelCard`: its metadata (`ModelCardData`) carries `base_model`
(a registry parent's artifact URI, the parent version named in the body), `datasets`,
`library_name` and, as `EvalResult`s, a `model-index` with one result per eval category (plus
one for the whole eval set) holding exactly the metrics the run reports, so the registry's
ModelVersion and the card agree (`card_metrics` reads them back). The body lists the dataset
digests, hyperparameters, device-hours, run name and the Comet experiment. The plot shows the
training and eval loss curves and the per-category tool-call accuracy of this version against
the production version when one is known.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, field

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard import REGEX_YAML_BLOCK

CARD_FILE = "README.md"
PLOT_FILE = "training.png"
ALL = "all"  # the model-index entry for the whole eval set


@dataclass
class CardInfo:
    name: str  # the run name (the registry's ModelVersion records it as sourceRun)
    base_model: str
    datasets: dict[str, str]  # split -> URI
    digests: dict[str, str]  # split -> sha256
    examples: dict[str, int]  # split -> examples used
    hyperparameters: dict
    metrics: dict[str, float | None]  # train_loss, eval_loss[/cat], tool_call_accuracy[/cat]
    steps: int
    tokens: int
    world_size: int
    device_hours: float
    tracking: dict = field(default_factory=dict)  # url, experimentKey
    curve: list[dict] = field(default_factory=list)  # {"step", "train_loss"[, "eval_loss"]}
    baseline: dict | None = None  # {"name": ..., "metrics": {...}} of the production version
    parent: str | None = None  # the ModelVersion trained from (a registry base model)


def _split(metric: str) -> tuple[str, str]:
    base, _, cat = metric.partition("/")
    return base, cat or ALL


def eval_results(eval_uri: str | None, metrics: dict[str, float | None]) -> list[EvalResult]:
    """The `model-index` entries: one result per category (dataset config = category, the whole
    eval set first as `all`), each metric under its flat name (`tool_call_accuracy/email`),
    finite values only."""
    finite = {k: float(v) for k, v in sorted(metrics.items())
              if v is not None and math.isfinite(float(v))}
    by_category = sorted(finite, key=lambda k: (_split(k)[1] != ALL, _split(k)[1]))
    return [EvalResult(task_type="text-generation", task_name="Tool calling",
                       dataset_type="chat-tools", dataset_name=eval_uri or "eval",
                       dataset_config=_split(k)[1], metric_type=_split(k)[0], metric_name=k,
                       metric_value=finite[k])
            for k in by_category]


def metadata(info: CardInfo) -> ModelCardData:
    return ModelCardData(
        base_model=info.base_model,
        datasets=sorted(set(info.datasets.values())),
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=["flywheel", "tool-calling"],
        model_name=info.name,
        eval_results=eval_results(info.datasets.get("eval"), info.metrics),
    )


def front_matter(text: str) -> dict:
    """The metadata block of a card, as `huggingface_hub` reads it."""
    if not text.startswith("---\n"):
        raise ValueError("a model card starts with a '---' YAML block")
    if not REGEX_YAML_BLOCK.search(text):
        raise ValueError("the model card's YAML block is not closed by '---'")
    return ModelCard(text).data.to_dict()


def card_metrics(text: str) -> dict[str, float]:
    """The metrics of a card's model-index, by their flat names (`tool_call_accuracy/email`)."""
    front_matter(text)  # the same errors for a card without metadata
    return {r.metric_name: r.metric_value for r in ModelCard(text).data.eval_results or []}


def _fmt(v) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def categories(metrics: dict) -> list[str]:
    return sorted({_split(k)[1] for k in metrics if "/" in k})


# A model card is its metadata block, then the Markdown body.
TEMPLATE = "---\n{{ card_data }}\n---\n\n{{ body }}"


def render(info: CardInfo) -> str:
    """README.md: the card's metadata, then what a reader checks first."""
    card = ModelCard.from_template(metadata(info), template_str=TEMPLATE, body=body(info))
    return str(card)


def body(info: CardInfo) -> str:
    m, base = info.metrics, (info.baseline or {}).get("metrics") or {}
    lines = [f"# {info.name}", "",
             f"Fine-tuned from `{info.base_model}` by the Flywheel FineTuneRun `{info.name}` "
             f"({info.steps} optimizer steps, {info.tokens} tokens, {info.world_size} ranks).", "",
             *([f"Parent version: `{info.parent}` (the registry version it was trained from).",
                ""] if info.parent else []),
             f"![training and eval loss, per-category accuracy]({PLOT_FILE})", "",
             "## Evaluation", "",
             f"Greedy tool-call accuracy (exact names and JSON arguments) and eval loss on "
             f"`{info.datasets.get('eval', '-')}`"
             + (f", against production (`{info.baseline['name']}`)." if base else "."), "",
             "| category | tool-call accuracy | eval loss |"
             + (" production accuracy |" if base else ""),
             "|---|---|---|" + ("---|" if base else "")]
    for cat in [ALL, *categories(m)]:
        suffix = "" if cat == ALL else f"/{cat}"
        acc = f"tool_call_accuracy{suffix}"
        lines.append(f"| {cat} | {_fmt(m.get(acc))} | {_fmt(m.get('eval_loss' + suffix))} |"
                     + (f" {_fmt(base.get(acc))} |" if base else ""))
    lines += ["", f"Final training loss: {_fmt(m.get('train_loss'))}.", "",
              "## Data", "", "| split | URI | examples | sha256 |", "|---|---|---|---|"]
    for split, uri in info.datasets.items():
        lines.append(f"| {split} | `{uri}` | {info.examples.get(split, '-')} | "
                     f"`{info.digests.get(split, '-')}` |")
    lines += ["", "## Training", "", "| hyperparameter | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in info.hyperparameters.items()]
    url, key = info.tracking.get("url"), info.tracking.get("experimentKey")
    comet = (f"[{url}]({url})" if url else
             f"offline (experiment key `{key}`; the archive is in `comet-offline/` beside this "
             "card: `comet upload <archive.zip>`)")
    lines += ["", f"- Run: `{info.name}`",
              *([f"- Parent version: `{info.parent}`"] if info.parent else []),
              f"- GPU-hours: {info.device_hours:.4f} (this attempt, {info.world_size} devices)",
              f"- Comet experiment: {comet}", ""]
    return "\n".join(lines)


def plot(info: CardInfo) -> bytes:
    """PNG: loss curves (left), per-category tool-call accuracy vs production (right)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_acc = fig.subplots(1, 2)
    train = [(p["step"], p["train_loss"]) for p in info.curve if p.get("train_loss") is not None]
    evals = [(p["step"], p["eval_loss"]) for p in info.curve if p.get("eval_loss") is not None]
    if info.metrics.get("eval_loss") is not None:  # the final evaluation
        evals = [e for e in evals if e[0] != info.steps] + [(info.steps, info.metrics["eval_loss"])]
    if train:
        ax_loss.plot(*zip(*train, strict=True), label="train loss")
    if evals:
        ax_loss.plot(*zip(*evals, strict=True), marker="o", label="eval loss")
    ax_loss.set(xlabel="optimizer step", ylabel="loss (assistant tokens)", title="Loss")
    ax_loss.legend()
    cats = [ALL, *categories(info.metrics)]
    key = [("tool_call_accuracy" if c == ALL else f"tool_call_accuracy/{c}") for c in cats]
    base = (info.baseline or {}).get("metrics") or {}
    width = 0.4 if base else 0.6
    xs = range(len(cats))
    ax_acc.bar([x - (width / 2 if base else 0) for x in xs],
               [info.metrics.get(k) or 0.0 for k in key], width, label="this version")
    if base:
        ax_acc.bar([x + width / 2 for x in xs], [base.get(k) or 0.0 for k in key], width,
                   label=f"production ({info.baseline['name']})")
    ax_acc.set_xticks(list(xs), cats)
    ax_acc.set(ylim=(0, 1.05), ylabel="tool-call accuracy", title="Accuracy per category")
    ax_acc.legend(loc="lower right")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", metadata={"Software": None})
    return buf.getvalue()


def card_files(info: CardInfo) -> dict[str, bytes]:
    """The files the export writes beside the weights."""
    return {CARD_FILE: render(info).encode(), PLOT_FILE: plot(info)}
