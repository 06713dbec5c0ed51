"""Quota strategies as pure functions: the paper's numbers by hand, shared guarantees, determinism."""

from __future__ import annotations

import math
import random
from typing import get_args

import pytest
from prometheus_client import REGISTRY
from pydantic import ValidationError

from dpe.events import CapabilityWeakness, WeaknessSnapshot
from dpe.settings import Settings
from streams.beta import credible_interval
from streams.contracts import CapabilityReport
from streams.merger import build_snapshot, export_plan, export_weakness, newer
from streams.settings import QuotaSettings, ScoringSettings, StrategyName
from streams.strategies import STRATEGIES, allocate, plan_quotas, step_weight


def weakness(error_rate: float, n: float = 200.0, trend: float = 0.0) -> CapabilityWeakness:
    low, high = credible_interval(1 + error_rate * n, 1 + (1 - error_rate) * n, 0.9)
    return CapabilityWeakness(error_rate=error_rate, effective_n=n, ci_low=low, ci_high=high, events=int(n),
                              trend=trend)


def snapshot(capabilities: dict[str, CapabilityWeakness], policy_version: int = 3) -> WeaknessSnapshot:
    return WeaknessSnapshot(seq=1, policy_version=policy_version, capabilities=capabilities,
                            events_total=sum(c.events for c in capabilities.values()))


def random_snapshot(rng: random.Random) -> WeaknessSnapshot:
    names = rng.sample([f"cap{i:02d}" for i in range(30)], rng.randint(1, 14))
    return snapshot({name: weakness(rng.random(), n=rng.choice([0.0, 3.0, 50.0, 3000.0]), trend=rng.uniform(-0.2, 0.2))
                     for name in names})


def test_registry_names_the_five_strategies_the_settings_accept():
    assert set(STRATEGIES) == set(get_args(StrategyName)) == {"dpe_step", "proportional", "uniform",
                                                               "learning_progress", "static"}
    with pytest.raises(ValidationError, match="'uniform', 'learning_progress' or 'static'"):
        QuotaSettings(strategy="roulette")


@pytest.mark.parametrize("accuracy,weight", [
    (0.0, 2.0), (0.6999, 2.0), (0.70, 1.5), (0.7499, 1.5), (0.75, 1.0), (0.8499, 1.0), (0.85, 0.8),
    (0.8999, 0.8), (0.90, 0.5), (1.0, 0.5),
])
def test_step_weights_follow_the_paper(accuracy, weight):
    assert step_weight(accuracy) == weight


def test_dpe_step_quotas_by_hand():
    # accuracies 0.6, 0.72, 0.8, 0.88, 0.95 -> weights 2.0, 1.5, 1.0, 0.8, 0.5 (sum 5.8)
    snap = snapshot({"a": weakness(0.40), "b": weakness(0.28), "c": weakness(0.20), "d": weakness(0.12),
                     "e": weakness(0.05)})
    plan = plan_quotas(snap, QuotaSettings(budget=1000), round=4)
    assert plan.weights == {"a": 2.0, "b": 1.5, "c": 1.0, "d": 0.8, "e": 0.5}
    paper = {name: math.floor(1000 * w / 5.8) for name, w in plan.weights.items()}
    assert paper == {"a": 344, "b": 258, "c": 172, "d": 137, "e": 86}  # sums to 997
    # the remainder of 3 goes to the largest fractional parts: d (.93), a (.83), b (.62)
    assert plan.quotas == {"a": 345, "b": 259, "c": 172, "d": 138, "e": 86}
    assert sum(plan.quotas.values()) == 1000


def test_proportional_quotas_by_hand():
    snap = snapshot({"a": weakness(0.6), "b": weakness(0.3), "c": weakness(0.1)})
    assert plan_quotas(snap, QuotaSettings(strategy="proportional", budget=100), round=0).quotas == \
        {"a": 60, "b": 30, "c": 10}


def test_uniform_is_uniform_whatever_the_weakness():
    rng = random.Random(1)
    for _ in range(50):
        snap = random_snapshot(rng)
        budget = rng.randint(len(snap.capabilities), 2000)
        quotas = plan_quotas(snap, QuotaSettings(strategy="uniform", budget=budget), round=0).quotas
        assert sum(quotas.values()) == budget
        assert max(quotas.values()) - min(quotas.values()) <= 1
        extra = sorted(name for name, q in quotas.items() if q > min(quotas.values()))
        assert extra == sorted(quotas)[:len(extra)], "the remainder goes to the first names, deterministically"


def test_learning_progress_discounts_capabilities_seen_a_few_times():
    snap = snapshot({"seen_3_times": weakness(1.0, n=3), "seen_3000_times": weakness(0.9, n=3000)})
    quotas = plan_quotas(snap, QuotaSettings(strategy="learning_progress", budget=100), round=0).quotas
    assert quotas["seen_3000_times"] > 1.5 * quotas["seen_3_times"]
    proportional = plan_quotas(snap, QuotaSettings(strategy="proportional", budget=100), round=0).quotas
    assert proportional["seen_3_times"] > proportional["seen_3000_times"], "point estimates ignore uncertainty"


def test_learning_progress_favours_weak_capabilities_that_still_improve():
    snap = snapshot({"improving": weakness(0.5, trend=-0.1), "stalled": weakness(0.5, trend=0.0),
                     "worsening": weakness(0.5, trend=0.05), "strong_improving": weakness(0.05, trend=-0.1)})
    plan = plan_quotas(snap, QuotaSettings(strategy="learning_progress", budget=1000), round=0)
    q = plan.quotas
    assert q["improving"] > q["stalled"] == q["worsening"] > q["strong_improving"]
    # weight = ci_low * (exploration + progress / best progress); both improving ones have the best progress
    ci_low = {name: cap.ci_low for name, cap in snap.capabilities.items()}
    assert plan.weights["improving"] == pytest.approx(ci_low["improving"] * 1.25)
    assert plan.weights["strong_improving"] == pytest.approx(ci_low["strong_improving"] * 1.25)
    assert plan.weights["stalled"] == pytest.approx(ci_low["stalled"] * 0.25)


def test_learning_progress_without_trends_is_proportional_to_the_lower_bound():
    snap = snapshot({"a": weakness(0.6), "b": weakness(0.2)})
    weights = STRATEGIES["learning_progress"](snap, QuotaSettings())
    ratio = snap.capabilities["a"].ci_low / snap.capabilities["b"].ci_low
    assert weights["a"] / weights["b"] == pytest.approx(ratio)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_shared_guarantees_on_random_snapshots(strategy):
    rng = random.Random(strategy)
    for _ in range(150):
        snap = random_snapshot(rng)
        n = len(snap.capabilities)
        floor, cap = rng.choice([0, 1, 5]), rng.choice([None, 40, 400])
        params = QuotaSettings(strategy=strategy, budget=rng.choice([0, n - 1, n, 100, 1000]) if n > 1 else 100,
                               floor=floor, cap=cap)
        quotas = plan_quotas(snap, params, round=0).quotas
        assert set(quotas) == set(snap.capabilities)
        reachable = params.budget if cap is None else min(params.budget, n * max(cap, 1))
        assert sum(quotas.values()) == reachable, "quotas sum exactly to the budget unless the caps forbid it"
        if params.budget >= n:
            assert min(quotas.values()) >= 1, "no capability is starved when the budget allows"
            if floor * n <= params.budget:
                assert min(quotas.values()) >= floor
        if cap is not None:
            assert max(quotas.values()) <= max(cap, 1)
        shuffled = snapshot(dict(rng.sample(list(snap.capabilities.items()), n)))
        assert plan_quotas(shuffled, params, round=0).quotas == quotas, "independent of input order"


def test_floors_and_caps_are_respected_exactly():
    weights = {"a": 100.0, "b": 1.0, "c": 1.0}
    assert allocate(weights, QuotaSettings(budget=10, floor=2)) == {"a": 6, "b": 2, "c": 2}
    assert allocate(weights, QuotaSettings(budget=10, cap=4)) == {"a": 4, "b": 3, "c": 3}
    assert allocate(weights, QuotaSettings(budget=10, floors={"c": 5}, caps={"a": 3})) == {"a": 3, "b": 2, "c": 5}
    assert allocate(weights, QuotaSettings(budget=100, cap=20)) == {"a": 20, "b": 20, "c": 20}, "caps win over budget"


def test_tiny_budgets_go_to_the_weakest():
    weights = {"a": 0.1, "b": 0.9, "c": 0.5}
    assert allocate(weights, QuotaSettings(budget=2)) == {"a": 0, "b": 1, "c": 1}
    assert allocate(weights, QuotaSettings(budget=0)) == {"a": 0, "b": 0, "c": 0}


def test_zero_weights_still_get_their_floor_and_all_zero_is_uniform():
    assert allocate({"a": 0.0, "b": 0.0, "c": 3.0}, QuotaSettings(budget=12)) == {"a": 1, "b": 1, "c": 10}
    assert allocate({"a": 0.0, "b": 0.0}, QuotaSettings(budget=7, floor=0)) == {"a": 4, "b": 3}


def test_plan_names_its_snapshot_and_policy_version():
    snap = snapshot({"a": weakness(0.3), "b": weakness(0.1)}, policy_version=9)
    plan = plan_quotas(snap, QuotaSettings(strategy="proportional", budget=40), round=12, producer="test")
    assert (plan.snapshot_id, plan.policy_version, plan.round, plan.strategy, plan.budget, plan.producer) == \
        (snap.snapshot_id, 9, 12, "proportional", 40, "test")
    assert plan_quotas(snap, QuotaSettings(strategy="proportional", budget=40), round=12).quotas == plan.quotas


# --- the planner's merge of worker reports (pure parts) ------------------------------------------


def report(revision: int, error_rate: float = 0.5, policy_version: int = 1) -> CapabilityReport:
    return CapabilityReport(revision=revision, policy_version=policy_version, weakness=weakness(error_rate, n=10))


def test_the_newest_revision_of_a_capability_wins():
    old, new = report(3), report(4)
    assert newer(None, old) and newer(old, new) and newer(new, new)
    assert not newer(new, old), "a stale report from a worker that lost the partition changes nothing"


def test_snapshots_cover_the_taxonomy_with_the_prior_for_unseen_capabilities():
    params = ScoringSettings(taxonomy=("chart", "color", "counting"), prior_errors=1.0, prior_successes=3.0)
    reports = {"chart": report(2, 0.4, policy_version=4), "counting": report(9, 0.1, policy_version=2),
               "juggling": report(1)}
    snap = build_snapshot(reports, params, seq=7)
    assert list(snap.capabilities) == ["chart", "color", "counting"], "closed taxonomy: juggling is left out"
    assert snap.capabilities["chart"] == reports["chart"].weakness
    assert snap.capabilities["color"].events == 0 and snap.capabilities["color"].error_rate == 0.25
    assert (snap.seq, snap.policy_version, snap.events_total) == (7, 4, 20)
    opened = build_snapshot(reports, params.model_copy(update={"open_taxonomy": True}), seq=8)
    assert "juggling" in opened.capabilities


def test_metrics_follow_the_latest_snapshot_and_plan():
    snap = snapshot({"metrics_a": weakness(0.4, n=50), "metrics_b": weakness(0.1, n=80)})
    plan = plan_quotas(snap, QuotaSettings(strategy="proportional", budget=50), round=0)
    before = REGISTRY.get_sample_value("dpe_quota_plans_total", {"strategy": "proportional"}) or 0.0
    export_weakness(snap)
    export_plan(plan)
    sample = REGISTRY.get_sample_value
    assert sample("dpe_weakness_error_rate", {"capability": "metrics_a"}) == 0.4
    assert sample("dpe_weakness_effective_n", {"capability": "metrics_b"}) == 80
    assert sample("dpe_weakness_error_rate_credible_bound", {"capability": "metrics_a", "bound": "low"}) == \
        snap.capabilities["metrics_a"].ci_low
    assert sample("dpe_quota_samples", {"capability": "metrics_a"}) == plan.quotas["metrics_a"] == 40
    assert sample("dpe_quota_plans_total", {"strategy": "proportional"}) == before + 1


def test_stream_settings_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("DPE_STREAM__QUOTAS__STRATEGY", "uniform")
    monkeypatch.setenv("DPE_CAPABILITIES", '["chart", "color"]')
    settings = Settings.load()
    assert settings.stream.quotas.strategy == "uniform"
    assert settings.stream.scoring.taxonomy == settings.capabilities == ("chart", "color")
    assert settings.stream.metrics_port == 9101
