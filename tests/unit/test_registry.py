"""Pure registry logic: summaries, gates, comparisons, serving patches."""

from __future__ import annotations

import pytest
from flywheel_operator import registry

DIGEST = "sha256:" + "ab" * 32


def test_summary_parses_and_drops_non_finite_metrics():
    s = registry.parse_summary(
        f'{{"artifact": {{"uri": "s3://m/a/", "digest": "{DIGEST}"}}, '
        '"metrics": {"eval_loss": 1.5, "tool_call_accuracy": null}, "steps": 3, "tokens": 99}')
    assert s.artifact.digest == DIGEST
    assert registry.finite_metrics(s.metrics) == {"eval_loss": 1.5}


@pytest.mark.parametrize("text, words", [
    (None, "no summary"),
    ("{", "not JSON"),
    ('{"error": "CUDA error: out of memory"}', "CUDA error"),
    ('{"artifact": {"uri": "s3://m/a/", "digest": "md5:1"}, "steps": 1, "tokens": 1}',
     "artifact.digest"),
    (f'{{"artifact": {{"uri": "s3://m/a/", "digest": "{DIGEST}"}}, "tokens": 1}}', "steps"),
])
def test_bad_summaries_say_what_is_wrong(text, words):
    with pytest.raises(registry.SummaryError, match=words):
        registry.parse_summary(text)


def test_gates_name_every_failure():
    promotion = {"gates": [{"metric": "eval_loss", "max": 2.0},
                           {"metric": "tool_call_accuracy/email", "min": 0.8},
                           {"metric": "tool_call_accuracy/crm", "min": 0.5}]}
    failures = registry.failed_gates(
        promotion, {"eval_loss": 2.5, "tool_call_accuracy/email": 0.9}, None)
    assert len(failures) == 2
    assert failures[0].startswith("eval_loss=2.5 > max 2")
    assert "tool_call_accuracy/crm is missing" in failures[1]
    assert registry.failed_gates(promotion, {"eval_loss": 1.0, "tool_call_accuracy/email": 0.8,
                                             "tool_call_accuracy/crm": 0.5}, None) == []


def test_no_regression_knows_which_direction_is_better():
    promotion = {"noRegression": {"metrics": ["eval_loss", "tool_call_accuracy"],
                                  "tolerance": 0.01}}
    base = {"eval_loss": 1.0, "tool_call_accuracy": 0.9}
    assert registry.failed_gates(promotion, {"eval_loss": 1.005, "tool_call_accuracy": 0.895},
                                 base) == []
    failures = registry.failed_gates(promotion, {"eval_loss": 1.2, "tool_call_accuracy": 0.8},
                                     base)
    assert [f.split(" ")[0] for f in failures] == ["eval_loss", "tool_call_accuracy"]
    # Nothing to regress against for the first version.
    assert registry.failed_gates(promotion, {"eval_loss": 9.0}, None) == []


def test_comparison_deltas_against_the_baseline():
    baseline = {"spec": {"version": 4, "metrics": {"eval_loss": 1.0, "acc/email": 0.5}}}
    cmp = registry.comparison("production", baseline, {"eval_loss": 0.75, "acc/email": 0.75,
                                                       "new": 1.0})
    assert cmp == {"alias": "production", "version": 4,
                   "deltas": {"acc/email": 0.25, "eval_loss": -0.25}}


def test_serving_patch_round_trips_through_serving_current():
    patch = registry.serving_patch("server", "s3://m/v3/", DIGEST)
    deployment = {"spec": {"template": {**patch["spec"]["template"]}}}
    assert registry.serving_current(deployment, "server") == ("s3://m/v3/", DIGEST)
