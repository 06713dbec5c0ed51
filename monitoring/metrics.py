"""Every Prometheus metric dpe-stream exports, in one registry of names.

Names follow Prometheus conventions under the ``dpe_`` prefix; label sets are bounded (topic,
stage, error class, capability, reason code, role). Services expose them with `serve_metrics`.
"""

from __future__ import annotations

import functools
import logging

from prometheus_client import REGISTRY, Counter, Gauge, Histogram, start_http_server

EVENTS_PUBLISHED = Counter("dpe_events_published_total", "Events published, by topic.", ["topic"])
EVENTS_CONSUMED = Counter("dpe_events_consumed_total", "Valid events consumed, by topic.", ["topic"])
DEADLETTERS = Counter(
    "dpe_deadletters_total", "Messages sent to the dead-letter topic, by origin topic, stage and error class.",
    ["topic", "stage", "error_class"],
)
CONSUMER_LAG = Gauge(
    "dpe_consumer_lag_messages", "Messages behind the fetch high-water mark, by group and topic.", ["group", "topic"]
)
HANDLE_SECONDS = Histogram(
    "dpe_handle_batch_seconds", "Time to handle one consumed batch, by service.", ["service"],
    buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)


@functools.cache
def published_counter(topic: str) -> Counter:
    """The labelled child of EVENTS_PUBLISHED for `topic` (cached: the publish path is hot)."""
    return EVENTS_PUBLISHED.labels(topic)


@functools.cache
def consumed_counter(topic: str) -> Counter:
    """The labelled child of EVENTS_CONSUMED for `topic` (cached: the consume path is hot)."""
    return EVENTS_CONSUMED.labels(topic)


_SERVED: set[tuple[str, int]] = set()


def serve_metrics(port: int, addr: str = "127.0.0.1") -> None:
    """Expose the default registry at http://addr:port/metrics (loopback unless told), once per process and address.

    A no-op for port 0 or an address already served by this process; a port taken by another
    process costs only this process's metrics (a warning), never the service.
    """
    if not port or (addr, port) in _SERVED:
        return
    try:
        start_http_server(port, addr=addr, registry=REGISTRY)
    except OSError as exc:
        logging.getLogger(__name__).warning("metrics port %s unavailable (%s); continuing without metrics",
                                            port, exc.strerror)
        return
    _SERVED.add((addr, port))


# Diagnosis producers: the evaluator (port 9102) and the divergence auditor (port 9103).
EVAL_ACCURACY = Gauge(
    "dpe_eval_accuracy", "Accuracy of the latest evaluated policy version, by capability and suite.",
    ["capability", "suite"],
)
EVAL_POLICY_VERSION = Gauge("dpe_eval_policy_version", "Policy version of the latest evaluation, by suite.", ["suite"])
EVAL_ITEMS = Counter("dpe_eval_items_total", "Diagnostic items evaluated, by suite and result.", ["suite", "result"])
EVAL_SECONDS = Histogram(
    "dpe_eval_seconds", "Time to evaluate one checkpoint on all its suites.",
    buckets=(1, 5, 10, 30, 60, 120, 300, 600, 1800),
)
EVAL_JUDGE_FALLBACKS = Counter(
    "dpe_eval_judge_fallbacks_total", "Failures attributed by rules because the judge failed, by reason.", ["reason"]
)
BENCHMARK_ROWS_SKIPPED = Counter(
    "dpe_benchmark_rows_skipped_total", "Benchmark file rows skipped at load, by suite and reason.", ["suite", "reason"]
)
AUDIT_ITEMS = Counter(
    "dpe_audit_items_total", "Unlabeled items seen by the auditor, by outcome (audited, sampled_out).", ["outcome"]
)
AUDIT_PROBES = Counter("dpe_audit_probes_total", "Probe questions asked of the target, by capability.", ["capability"])
AUDIT_DIVERGENCES = Counter(
    "dpe_audit_divergences_total", "Divergences published (references agree, target differs), by capability.",
    ["capability"],
)

# Ingest and the agent crew (producers/ingest.py, consumers/). Reason codes and capabilities are bounded sets.
INGEST_ITEMS = Counter(
    "dpe_ingest_items_total", "Ingest inputs by outcome (published/skipped) and reason code.", ["outcome", "reason"]
)
QC_CHECKS = Counter(
    "dpe_qc_checks_total", "Quality-control check results by check and reason code ('ok' when passed).",
    ["check", "reason"],
)
AGENT_SAMPLES = Counter(
    "dpe_agent_samples_total", "Candidate samples by capability and outcome (accepted/rejected).",
    ["capability", "outcome"],
)
AUDIT_FAILURE_TYPES = Counter(
    "dpe_audit_failure_types_total", "Divergences by named failure type (capability/kind/edit/pattern).",
    ["failure_type"],
)
AGENT_ITEMS = Counter("dpe_agent_items_total", "Unlabeled items handled by the agent crew, by outcome.", ["outcome"])
AGENT_LEADS = Counter("dpe_agent_leads_total", "Audit leads (rectification) handled by the agent crew, by outcome: "
                      "accepted, rejected (by QC), skipped (no room under the plan).", ["outcome"])
AGENT_ROLE_SECONDS = Histogram(
    "dpe_agent_role_seconds", "Time of one agent role call, by role and backend kind.", ["role", "backend"],
    buckets=(0.0005, 0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5, 30),
)
LLM_REQUESTS = Counter(
    "dpe_agent_llm_requests_total",
    "OpenAI-compatible requests by role and result (ok, timeout, rate_limited, server_error, connection_error, "
    "invalid_output).",
    ["role", "result"],
)
QUOTA_REMAINING = Gauge(
    "dpe_agent_quota_remaining", "Samples still to make for the current quota plan, by capability.", ["capability"]
)
QUOTA_PLAN_STARTED = Gauge(
    "dpe_agent_plan_published_timestamp_seconds", "When the quota plan the agents follow was published (Unix time)."
)
AGENT_POLICY_VERSION = Gauge("dpe_agent_policy_version", "Policy version the difficulty check measures against.")
AGENT_BAND_ROLLOUTS = Counter("dpe_agent_band_rollouts_total", "Answers the difficulty check sampled from the policy.")
AGENT_OUT_OF_REACH = Gauge(
    "dpe_agent_out_of_reach",
    "1 for a capability of which the difficulty band keeps almost no sample of the current policy: its quota room goes "
    "to the other capabilities.",
    ["capability"],
)

WEAKNESS_EVENTS = Counter(
    "dpe_weakness_events_total",
    "Evidence events handled by the weakness stream, by topic and result (applied, duplicate, superseded, late, "
    "measure_only; redelivered and held_back: skipped by the partition-order gate).",
    ["topic", "result"],
)
WEAKNESS_ERROR_RATE = Gauge(
    "dpe_weakness_error_rate", "Decayed error rate per capability in the latest weakness snapshot.", ["capability"]
)
WEAKNESS_CREDIBLE_BOUND = Gauge(
    "dpe_weakness_error_rate_credible_bound",
    "Credible interval bounds (bound=low|high) of the error rate per capability.", ["capability", "bound"],
)
WEAKNESS_EFFECTIVE_N = Gauge(
    "dpe_weakness_effective_n", "Decayed number of observations behind each capability's error rate.", ["capability"]
)
QUOTA_SAMPLES = Gauge("dpe_quota_samples", "Samples per capability in the latest quota plan.", ["capability"])
QUOTA_PLANS = Counter("dpe_quota_plans_total", "Quota plans published, by strategy.", ["strategy"])

# GRPO trainer (port 9105).
TRAINER_REWARD = Gauge("dpe_trainer_reward_mean", "Mean reward (0.9 accuracy + 0.1 format) over the last round's rollouts.")
TRAINER_REWARD_STD = Gauge("dpe_trainer_reward_std", "Standard deviation of the reward over the last round's rollouts.")
TRAINER_ZERO_STD = Gauge(
    "dpe_trainer_zero_variance_group_fraction", "Share of the last round's groups whose rewards were all equal (no signal)."
)
TRAINER_KL = Gauge("dpe_trainer_kl", "Mean KL to the reference (the round's parent policy) over the last round.")
TRAINER_LOSS = Gauge("dpe_trainer_loss", "Mean GRPO loss over the last round's steps.")
TRAINER_STEP_SECONDS = Histogram(
    "dpe_trainer_step_seconds", "Time of one GRPO optimiser step (rollouts, scoring, backward, update).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
)
TRAINER_TOKENS_PER_SECOND = Gauge("dpe_trainer_tokens_per_second", "Prompt and completion tokens per second of training.")
TRAINER_SAMPLE_OUTCOMES = ("trained", "duplicate", "stale_dropped", "stale_downweighted", "dead_lettered")
TRAINER_SAMPLES = Counter(
    "dpe_trainer_samples_total", f"Accepted samples consumed, by outcome ({', '.join(TRAINER_SAMPLE_OUTCOMES)}).",
    ["outcome"],
)
TRAINER_ROUNDS = Counter("dpe_trainer_rounds_total", "Micro-rounds trained and checkpointed.")
TRAINER_POLICY_VERSION = Gauge("dpe_trainer_policy_version", "Policy version of the latest checkpoint.")
TRAINER_LAG = Gauge("dpe_trainer_lag_messages", "Accepted samples waiting behind the trainer's read position.")
TRAINER_CHECKPOINT_SECONDS = Histogram(
    "dpe_trainer_checkpoint_write_seconds", "Time to write, verify-digest and rename one checkpoint.",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
)
TRAINER_ROUND_SECONDS = Histogram(
    "dpe_trainer_round_seconds", "Time per round phase (consume, train, checkpoint, announce).", ["phase"],
    buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 1800),
)

# Policy server (`dpe serve policy`).
POLICY_SERVER_VERSION = Gauge("dpe_policy_server_version", "Newest policy version the policy server answers with.")
POLICY_SERVER_LOADS = Counter(
    "dpe_policy_server_loads_total", "Announced checkpoints the policy server tried to load, by outcome (loaded, "
    "refused, failed).", ["outcome"],
)
POLICY_SERVER_LOAD_SECONDS = Histogram(
    "dpe_policy_server_load_seconds", "Time to load one checkpoint where the placement puts it (its reload time).",
    buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)
