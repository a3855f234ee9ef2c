"""Pure registry logic: summaries, gates, comparisons, serving patches."""

from __future__ import annotations

import pytest
from flywheel_operator import registry
from flywheel_trainer import contract

DIGEST = "sha256:" + "ab" * 32


def test_summary_parses_and_drops_non_finite_metrics():
    s = contract.parse_summary(
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
    with pytest.raises(contract.SummaryError, match=words):
        contract.parse_summary(text)


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


# --- registration and promotion decisions (registry.record_version and friends) ------------

NOW = "2026-11-26T12:00:00Z"
PROMOTE = {"promotion": {"alias": "production"}}  # as the API server defaults `promotion: {}`


def version(n: int, metrics: dict | None = None, uid: str = "") -> dict:
    return {"metadata": {"name": f"m-v{n}", "labels": {registry.RUN_UID_LABEL: uid or f"u{n}"}},
            "spec": {"version": n, "metrics": metrics or {},
                     "artifact": {"uri": f"s3://m/v{n}/", "digest": DIGEST}}}


def model(spec: dict | None = None, status: dict | None = None) -> dict:
    return {"metadata": {"name": "m", "namespace": "ns", "generation": 2},
            "spec": spec or {}, "status": status or {}}


def promoted(m: dict, n: int) -> dict:
    """`m` with its production alias at version n (as a past promotion left it)."""
    m["status"].setdefault("aliases", {})["production"] = registry.alias_target(version(n), NOW)
    return m


def test_version_numbers_and_a_retried_registration():
    versions = [version(1), version(2, uid="run-b")]
    assert registry.next_version(versions) == 3 and registry.next_version([]) == 1
    assert registry.own_version(versions, "run-b")["metadata"]["name"] == "m-v2"
    assert registry.own_version(versions, "run-c") is None


def test_without_promotion_only_latest_moves():
    update = registry.record_version(model(), version(1), None, NOW)
    assert update.status["aliases"] == {"latest": registry.alias_target(version(1), NOW)}
    assert [v["name"] for v in update.status["versions"]] == ["m-v1"]
    assert update.promoted is None and not update.events


def test_passing_gates_promote_and_say_so():
    m = model({"promotion": {"alias": "production",
                             "gates": [{"metric": "eval_loss", "max": 2.0}]}})
    update = registry.record_version(m, version(1, {"eval_loss": 1.0}), None, NOW)
    assert update.status["aliases"]["production"]["version"] == 1
    assert update.promoted == "production"
    assert update.events == [("Normal", "Promoted", "version 1 promoted to production")]
    (cond,) = update.status["conditions"]
    assert (cond["type"], cond["status"], cond["reason"]) == ("Promoted", "True", "GatesPassed")


def test_a_failed_gate_blocks_and_names_the_metric():
    m = promoted(model({"promotion": {"gates": [{"metric": "eval_loss", "max": 2.0}]}}), 1)
    update = registry.record_version(m, version(2, {"eval_loss": 3.0}), version(1), NOW)
    assert update.status["aliases"]["production"]["version"] == 1  # unchanged
    assert update.status["aliases"]["latest"]["version"] == 2
    assert update.promoted is None and update.blocked_gates == ["eval_loss"]
    assert update.events[0][:2] == ("Warning", "PromotionBlocked")
    assert "eval_loss=3 > max 2" in update.events[0][2]


def test_no_regression_compares_with_the_promoted_version():
    m = promoted(model({"promotion": {"noRegression": {"metrics": ["eval_loss"]}}}), 1)
    base = registry.baseline(m, {"m-v1": version(1, {"eval_loss": 1.0})}.get)
    assert base["spec"]["version"] == 1
    worse = registry.record_version(m, version(2, {"eval_loss": 1.5}), base, NOW)
    assert worse.blocked_gates == ["eval_loss"]
    better = registry.record_version(m, version(2, {"eval_loss": 0.5}), base, NOW)
    assert better.promoted == "production"


def test_a_pinned_alias_is_not_promoted():
    m = promoted(model({**PROMOTE, "pinnedAliases": {"production": 1}}), 1)
    update = registry.record_version(m, version(2), version(1), NOW)
    assert update.status["aliases"]["production"]["version"] == 1 and update.promoted is None
    assert update.status["conditions"][0]["reason"] == "AliasPinned" and not update.events


def test_promotion_is_decided_once_and_only_for_the_newest_version():
    m = model(PROMOTE)
    first = registry.record_version(m, version(2), None, NOW)
    again = registry.record_version(model(PROMOTE, first.status), version(2), None, NOW)
    assert first.promoted == "production" and again.promoted is None and not again.events
    older = registry.record_version(model(PROMOTE, first.status), version(1), None, NOW)
    assert older.promoted is None and older.status["aliases"]["latest"]["version"] == 2
    assert [v["version"] for v in older.status["versions"]] == [1, 2]


def test_pins_to_move():
    m = promoted(model({"pinnedAliases": {"production": 1, "canary": 3}}), 1)
    assert registry.pins_to_move(m) == {"canary": 3}


def test_pinned_aliases_move_to_their_versions_and_unknown_pins_are_reported():
    m = promoted(model({"pinnedAliases": {"production": 1, "canary": 7}}), 2)
    update = registry.pin_aliases(m, {"production": version(1), "canary": None}, NOW)
    assert update.status["aliases"]["production"] == registry.alias_target(version(1), NOW)
    assert "canary" not in update.status["aliases"]
    assert [e[1] for e in update.events] == ["PinUnknownVersion", "AliasPinned"]
    assert "canary is pinned to version 7" in update.events[0][2]
    assert update.events[1][2] == "production -> version 1 (pinned)"


def test_a_long_history_lists_only_the_newest_versions_and_numbers_go_on():
    # An hourly schedule registers thousands of versions into one Model: its status (read and
    # written whole at every registration) lists the newest, never growing toward etcd's
    # object size limit; the next number still follows the newest, and the aliases their own.
    m = promoted(model(PROMOTE), 3)
    for n in range(1, 251):
        m = model(PROMOTE, registry.record_version(m, version(n), version(n - 1) if n > 1
                                                   else None, NOW).status)
    listed = [r["version"] for r in m["status"]["versions"]]
    assert listed == list(range(151, 251)) == sorted(listed)
    assert m["status"]["aliases"]["latest"]["version"] == 250
    assert m["status"]["aliases"]["production"]["version"] == 250
    assert registry.next_version([], set(registry.recorded_numbers(m))) == 251
