"""Weakness scoring as pure functions: hand-computed numbers, idempotence, order independence, bounds."""

from __future__ import annotations

import math
import random
from datetime import datetime, timedelta, timezone

import pytest

from dpe.events import BlobRef, Divergence, EvalOutcome
from streams.beta import beta_cdf, beta_ppf, credible_interval
from streams.scoring import (
    MAX_VERSION_LEAP,
    Applied,
    CapabilityState,
    RejectedEvidence,
    apply,
    divergence_evidence,
    dump_state,
    load_state,
    outcome_evidence,
    replay,
    summarise,
)
from streams.settings import ScoringSettings

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
PARAMS = ScoringSettings(taxonomy=("counting", "color", "chart"))


def outcome(version: int, item: str, score: float, *, capability: str = "counting", seconds: float = 0.0,
            event_id: str | None = None) -> EvalOutcome:
    fields = dict(policy_version=version, suite="diag", item_id=item, capability=capability, answer_type="number",
                  expected="3", predicted="3" if score == 1.0 else "4", correct=score == 1.0, score=score,
                  ts=T0 + timedelta(seconds=seconds))
    return EvalOutcome(**fields, **({"event_id": event_id} if event_id else {}))


def divergence(version: int, probe: str, strength: float, *, capability: str = "counting",
               diverged: bool = True) -> Divergence:
    image = BlobRef(sha256="a" * 64, media_type="image/png", size_bytes=10, width=8, height=8)
    return Divergence(policy_version=version, item_id="img", probe_id=probe, capability=capability, question="?",
                      image=image, target_answer="3" if diverged else "4", reference_answers={"ref": "4"},
                      consensus_answer="4", consensus_strength=strength, ts=T0, diverged=diverged)


def state_of(events, params: ScoringSettings = PARAMS) -> CapabilityState:
    states = replay([outcome_evidence(e, params) for e in events], params)
    return states["counting"]


def incomplete_beta_integer(x: float, a: int, b: int) -> float:
    """I_x(a, b) for integer a, b: the probability of at least a successes in a + b - 1 trials."""
    n = a + b - 1
    return sum(math.comb(n, j) * x**j * (1 - x) ** (n - j) for j in range(a, n + 1))


# --- Beta distribution -------------------------------------------------------------------------


@pytest.mark.parametrize("a,b", [(1, 1), (2, 3), (4, 2), (9, 3), (30, 12)])
def test_beta_cdf_matches_the_binomial_identity(a, b):
    for x in (0.01, 0.2, 0.5, 0.77, 0.99):
        assert beta_cdf(x, a, b) == pytest.approx(incomplete_beta_integer(x, a, b), abs=1e-12)


def test_beta_quantiles_match_closed_forms():
    for p in (0.05, 0.5, 0.95):
        assert beta_ppf(p, 1.0, 1.0) == pytest.approx(p, abs=1e-12)
        assert beta_ppf(p, 4.0, 1.0) == pytest.approx(p ** (1 / 4), abs=1e-12)
        assert beta_ppf(p, 1.0, 3.0) == pytest.approx(1 - (1 - p) ** (1 / 3), abs=1e-12)
    low, high = credible_interval(250.5, 4000.25, 0.9)
    assert beta_cdf(low, 250.5, 4000.25) == pytest.approx(0.05, abs=1e-10)
    assert beta_cdf(high, 250.5, 4000.25) == pytest.approx(0.95, abs=1e-10)


# --- hand-computed summaries -------------------------------------------------------------------


def test_no_evidence_gives_the_prior():
    params = ScoringSettings(taxonomy=("counting",), prior_errors=2.0, prior_successes=6.0, credible_level=0.8)
    weakness = summarise(CapabilityState(), params)
    assert weakness.error_rate == 0.25 and weakness.effective_n == 0 and weakness.events == 0
    assert (weakness.ci_low, weakness.ci_high) == credible_interval(2.0, 6.0, 0.8)
    assert weakness.trend == 0.0


def test_decay_in_policy_versions_by_hand():
    # version 1: 4 items, 2 wrong; version 2: 2 items, both wrong; half-life 1 version.
    events = [outcome(1, f"a{i}", s) for i, s in enumerate([0.0, 1.0, 0.0, 1.0])]
    events += [outcome(2, f"b{i}", 0.0) for i in range(2)]
    weakness = summarise(state_of(events), PARAMS)
    # weights: version 1 counts 0.5 each -> n = 4 * 0.5 + 2 = 4; errors = 2 * 0.5 + 2 = 3
    assert weakness.effective_n == 4.0
    assert weakness.error_rate == 0.75
    low, high = weakness.ci_low, weakness.ci_high
    assert incomplete_beta_integer(low, 4, 2) == pytest.approx(0.05, abs=1e-10)  # posterior Beta(1 + 3, 1 + 1)
    assert incomplete_beta_integer(high, 4, 2) == pytest.approx(0.95, abs=1e-10)
    assert weakness.events == 6
    assert weakness.trend == pytest.approx(0.5)  # error rate 0.5 at v1, 1.0 at v2


def test_decay_in_events_by_hand():
    params = ScoringSettings(taxonomy=("counting",), half_life=2.0, half_life_unit="events")
    scores = [0.0, 1.0, 1.0, 0.0]  # oldest first: the newest and the oldest are wrong
    events = [outcome(1, f"i{i}", s, seconds=i) for i, s in enumerate(scores)]
    weakness = summarise(state_of(events, params), params)
    weights = [2 ** (-r / 2) for r in range(4)]  # newest first: 1, 0.707, 0.5, 0.354
    assert weakness.effective_n == pytest.approx(sum(weights))
    assert weakness.error_rate == pytest.approx((weights[0] + weights[3]) / sum(weights))


def test_partial_scores_count_as_partial_errors():
    weakness = summarise(state_of([outcome(1, "a", 0.25), outcome(1, "b", 1.0)]), PARAMS)
    assert weakness.error_rate == pytest.approx(0.375)


def test_trend_is_the_weighted_slope_of_per_version_error_rates():
    events = [outcome(1, f"a{i}", 0.0 if i < 8 else 1.0) for i in range(10)]  # 0.8 wrong, n = 10
    events += [outcome(2, f"b{i}", 0.0 if i < 15 else 1.0) for i in range(30)]  # 0.5 wrong, n = 30
    events += [outcome(3, f"c{i}", 0.0 if i < 2 else 1.0) for i in range(10)]  # 0.2 wrong, n = 10
    # weighted means: x = 2, y = 0.5; cov = 10(-1)(0.3) + 10(1)(-0.3) = -6; var = 20
    assert summarise(state_of(events), PARAMS).trend == pytest.approx(-0.3)


def test_divergences_are_weighted_errors():
    params = ScoringSettings(taxonomy=("counting",), divergence_weight=0.5, divergence_share=1.0)
    evidence = [outcome_evidence(outcome(1, "a", 1.0), params), divergence_evidence(divergence(1, "p1", 0.8), params)]
    weakness = summarise(replay(evidence, params)["counting"], params)
    assert weakness.effective_n == pytest.approx(1.4)
    assert weakness.error_rate == pytest.approx(0.4 / 1.4)
    assert weakness.events == 2


def test_audited_agreements_are_successes_so_the_audit_gives_a_rate():
    """A target that matches the references on 9 probes of 10 is 10 % wrong by the audit, not 100 %."""
    params = ScoringSettings(taxonomy=("counting",), divergence_weight=1.0, divergence_share=1.0)
    verdicts = [divergence_evidence(divergence(1, f"p{i}", 1.0, diverged=i == 0), params) for i in range(10)]
    weakness = summarise(replay(verdicts, params)["counting"], params)
    assert weakness.effective_n == pytest.approx(10.0) and weakness.error_rate == pytest.approx(0.1)


def test_divergences_never_outweigh_their_share_of_the_outcomes():
    """Thousands of audited probes must not drown 20 graded outcomes."""
    params = ScoringSettings(taxonomy=("counting",), divergence_weight=0.5, divergence_share=0.25)
    outcomes = [outcome_evidence(outcome(1, f"o{i}", 1.0 if i < 15 else 0.0), params) for i in range(20)]
    divergences = [divergence_evidence(divergence(1, f"p{i}", 1.0), params) for i in range(2000)]
    weakness = summarise(replay(outcomes + divergences, params)["counting"], params)
    # outcomes: weight 20, 5 errors; divergences scaled to a quarter of the total: weight 20/3, all errors
    assert weakness.effective_n == pytest.approx(20 + 20 / 3)
    assert weakness.error_rate == pytest.approx((5 + 20 / 3) / (20 + 20 / 3))
    alone = summarise(replay(divergences[:10], params)["counting"], params)
    assert alone.effective_n == pytest.approx(5.0), "without outcomes, divergences are all the evidence"


# --- idempotence and order ---------------------------------------------------------------------


def test_the_same_event_delivered_twice_is_a_duplicate():
    event = outcome(1, "a", 0.0)
    state = CapabilityState()
    assert apply(state, outcome_evidence(event, PARAMS), PARAMS) is Applied.APPLIED
    snapshot = load_state(dump_state(state))
    assert apply(state, outcome_evidence(event, PARAMS), PARAMS) is Applied.DUPLICATE
    assert state == snapshot


def test_a_rerun_replaces_and_an_older_rerun_is_ignored():
    first, rerun = outcome(1, "a", 0.0, seconds=1), outcome(1, "a", 1.0, seconds=2)
    state = state_of([first, outcome(1, "b", 0.0)])
    assert apply(state, outcome_evidence(rerun, PARAMS), PARAMS) is Applied.APPLIED
    weakness = summarise(state, PARAMS)
    assert weakness.events == 2 and weakness.error_rate == 0.5, "a re-run overwrites, it does not add"
    assert apply(state, outcome_evidence(first, PARAMS), PARAMS) is Applied.SUPERSEDED
    assert summarise(state, PARAMS) == weakness


def random_log(rng: random.Random, versions: range, per_version: int, reruns: int) -> list[EvalOutcome]:
    """Outcomes over `versions`, with re-runs (same outcome id, later ts, maybe another result)."""
    events = []
    for version in versions:
        for item in range(per_version):
            events.append(outcome(version, f"i{item}", rng.choice([0.0, 0.5, 1.0]), seconds=rng.random()))
        for _ in range(reruns):
            item = rng.randrange(per_version)
            events.append(outcome(version, f"i{item}", rng.choice([0.0, 1.0]), seconds=1 + rng.random()))
    return events


@pytest.mark.parametrize("unit", ["versions", "events"])
def test_any_order_with_duplicates_gives_the_same_state(unit):
    params = ScoringSettings(taxonomy=("counting",), keep_versions=4, half_life_unit=unit, half_life=1.5)
    rng = random.Random(7)
    events = random_log(rng, range(4), per_version=12, reruns=6)
    reference = state_of(events, params)
    expected = summarise(reference, params)
    for _ in range(300):
        delivery = events + rng.sample(events, rng.randrange(len(events)))
        rng.shuffle(delivery)
        state = state_of(delivery, params)
        assert state == reference
        assert summarise(state, params) == expected


@pytest.mark.parametrize("unit", ["versions", "events"])
def test_redelivery_within_the_window_gives_the_same_state_across_many_versions(unit):
    """Versions arrive in order (as the evaluator publishes them); inside the window anything goes."""
    params = ScoringSettings(taxonomy=("counting",), keep_versions=3, half_life_unit=unit)
    rng = random.Random(11)
    events = random_log(rng, range(12), per_version=8, reruns=3)
    reference = state_of(events, params)
    for _ in range(100):
        delivery: list[EvalOutcome] = []
        for version in range(12):
            in_window = [e for e in events if version - params.keep_versions < e.policy_version <= version]
            batch = [e for e in events if e.policy_version == version]
            batch += rng.sample(in_window, rng.randrange(len(in_window) // 2))
            rng.shuffle(batch)
            delivery += batch
        assert state_of(delivery, params) == reference


@pytest.mark.parametrize("unit", ["versions", "events"])
def test_folding_old_versions_does_not_change_the_summary(unit):
    base = dict(taxonomy=("counting",), half_life_unit=unit, half_life=2.0, trend_versions=20)
    everything = ScoringSettings(**base, keep_versions=50)
    bounded = ScoringSettings(**base, keep_versions=2)
    events = random_log(random.Random(3), range(10), per_version=10, reruns=2)
    kept, folded = state_of(events, everything), state_of(events, bounded)
    assert len(kept.ledgers["outcome"].window) == 10 and len(folded.ledgers["outcome"].window) == 2
    a, b = summarise(kept, everything), summarise(folded, bounded)
    assert b.events == a.events
    for field in ("error_rate", "effective_n", "ci_low", "ci_high", "trend"):
        assert getattr(b, field) == pytest.approx(getattr(a, field), rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("unit", ["versions", "events"])
def test_sources_read_at_different_speeds_give_the_same_state(unit):
    """Outcomes and divergences come on two topics: either may run many versions ahead of the other."""
    params = ScoringSettings(taxonomy=("counting",), keep_versions=2, half_life_unit=unit, trend_versions=20)
    rng = random.Random(13)
    outcomes = [outcome_evidence(e, params) for e in random_log(rng, range(8), per_version=6, reruns=2)]
    divergences = [divergence_evidence(divergence(v, f"p{i}", rng.random()), params)
                   for v in range(8) for i in range(3)]
    reference = replay(outcomes + divergences, params)["counting"]
    assert replay(divergences + outcomes, params)["counting"] == reference
    for _ in range(50):  # random interleavings that keep each source's own order
        merged, pending = [], {"o": list(outcomes), "d": list(divergences)}
        while pending["o"] or pending["d"]:
            merged.append(pending[rng.choice([k for k, rest in pending.items() if rest])].pop(0))
        assert replay(merged, params)["counting"] == reference
    assert summarise(reference, params).events == len({e.key for e in outcomes}) + len(divergences)


def test_state_stays_bounded_and_late_evidence_is_ignored():
    params = ScoringSettings(taxonomy=("counting",), keep_versions=3, trend_versions=4)
    state = state_of(random_log(random.Random(5), range(40), per_version=5, reruns=1), params)
    ledger = state.ledgers["outcome"]
    assert sorted(ledger.window) == [37, 38, 39]
    assert len(ledger.history) == 4 and ledger.folded_through == 36
    before = load_state(dump_state(state))
    assert apply(state, outcome_evidence(outcome(10, "late", 0.0), params), params) is Applied.LATE
    assert state == before


def test_state_round_trips_through_its_changelog_bytes():
    state = state_of(random_log(random.Random(9), range(6), per_version=5, reruns=2))
    state.revision = 42
    restored = load_state(dump_state(state))
    assert restored == state and restored.revision == 42
    assert summarise(restored, PARAMS) == summarise(state, PARAMS)


# --- rejections --------------------------------------------------------------------------------


def test_unknown_capabilities_are_rejected_unless_the_taxonomy_is_open():
    event = outcome(1, "a", 0.0, capability="juggling")
    with pytest.raises(RejectedEvidence) as caught:
        outcome_evidence(event, PARAMS)
    assert caught.value.error_class == "UnknownCapability" and "juggling" in caught.value.message
    assert caught.value.stage == "weakness.score"
    open_params = PARAMS.model_copy(update={"open_taxonomy": True})
    assert outcome_evidence(event, open_params).capability == "juggling"


@pytest.mark.parametrize("score", [float("nan"), -0.1, 1.5, float("inf")])
def test_scores_outside_the_unit_interval_are_rejected(score):
    event = outcome(1, "a", 0.0).model_copy(update={"score": score})  # bypasses validation, like a buggy producer
    with pytest.raises(RejectedEvidence) as caught:
        outcome_evidence(event, PARAMS)
    assert caught.value.error_class == "InvalidScore" and "score" in caught.value.message


def test_bad_consensus_strength_is_rejected():
    event = divergence(1, "p", 0.5).model_copy(update={"consensus_strength": float("nan")})
    with pytest.raises(RejectedEvidence, match="consensus_strength"):
        divergence_evidence(event, PARAMS)


# --- reach: no single event freezes a state ------------------------------------------------------


def test_a_version_far_ahead_of_the_state_is_refused_with_a_reason_not_adopted():
    state = state_of(random_log(random.Random(21), range(1, 4), per_version=5, reruns=1))
    before = load_state(dump_state(state))
    far = outcome_evidence(outcome(10**8, "far", 0.0), PARAMS)
    with pytest.raises(RejectedEvidence) as caught:
        apply(state, far, PARAMS)
    assert caught.value.error_class == "VersionTooFarAhead" and caught.value.stage == "weakness.score"
    assert str(10**8) in caught.value.message and "counting" in caught.value.message
    assert state == before, "refused evidence leaves the state as it was"
    assert apply(state, outcome_evidence(outcome(4, "next", 1.0), PARAMS), PARAMS) is Applied.APPLIED
    assert state.newest == 4


def test_a_version_a_little_ahead_is_still_taken():
    state = state_of([outcome(3, "a", 0.0)])
    assert apply(state, outcome_evidence(outcome(3 + MAX_VERSION_LEAP, "b", 1.0), PARAMS), PARAMS) is Applied.APPLIED


@pytest.mark.parametrize("outlier_first", [True, False])
def test_a_lone_outlier_is_dropped_whichever_comes_first(outlier_first):
    good = [outcome(v, f"i{v}", v % 2) for v in (1, 2, 3)]
    outlier = outcome(10**8, "bogus", 0.0)
    events = [outlier, *good] if outlier_first else [good[0], outlier, *good[1:]]
    state = CapabilityState()
    for event in events:
        try:
            apply(state, outcome_evidence(event, PARAMS), PARAMS)
        except RejectedEvidence:
            assert not outlier_first, "the outlier is only refused once the ledger has evidence"
    assert state == state_of(good), "the outlier leaves no trace: the good outcomes all count"
    assert summarise(state, PARAMS).events == 3


def test_a_source_first_seen_far_ahead_of_the_other_is_taken():
    """Sources are read at different speeds: the first divergence may be far ahead of the outcomes."""
    state = state_of([outcome(1, "a", 0.0)])
    far = divergence_evidence(divergence(5 * MAX_VERSION_LEAP, "p", 1.0), PARAMS)
    assert apply(state, far, PARAMS) is Applied.APPLIED
    assert apply(state, outcome_evidence(outcome(2, "b", 1.0), PARAMS), PARAMS) is Applied.APPLIED


def test_replay_leaves_refused_evidence_out_like_the_stream():
    good = [outcome(1, "a", 0.0), outcome(2, "b", 1.0)]
    evidence = [outcome_evidence(e, PARAMS) for e in (good[0], outcome(10**8, "bogus", 0.0), good[1])]
    assert replay(evidence, PARAMS)["counting"] == state_of(good)
