"""The evaluator service: each Checkpoint event becomes one EvalOutcome per diagnostic item.

For policy version v it evaluates the fixed held-out suite (suite ``heldout``: the same items every
version, for reporting only), a fresh synthetic sample for v, and every configured benchmark file
(all rows, or a fresh sample of them per version). Outcomes go to the eval-outcomes topic keyed by
capability; re-evaluating a checkpoint (a redelivery after a crash, `dpe eval`) reproduces the same
outcome ids, which consumers overwrite. A checkpoint that cannot be evaluated (missing folder,
unreadable weights, a folder outside the checkpoint roots, never loaded, or under ``inference.mode: server``
never served within ``inference.wait_s``) is dead-lettered with the reason, and the service keeps going; a policy
server that cannot be reached is a transient failure, retried.

Example:
    >>> stop = asyncio.Event()
    >>> asyncio.run(serve_evaluator(EvaluatorConfig.load(), stop))   # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from pathlib import Path

from aiokafka.errors import KafkaError

from dpe.blobstore import BlobStore, ImageLimits
from dpe.bus.aio import AsyncPublisher, AsyncSubscriber, TransientError
from dpe.bus.delivery import Delivery
from dpe.endpoint.client import EndpointClient, EndpointFailure
from dpe.events import Checkpoint, Diagnosis, EvalOutcome
from dpe.inference import PolicyVersions
from dpe.policy.checkpoints import allowed_roots
from monitoring.metrics import BENCHMARK_ROWS_SKIPPED, EVAL_ACCURACY, EVAL_ITEMS, EVAL_POLICY_VERSION, EVAL_SECONDS
from producers.evaluator.diagnosis import diagnose
from producers.evaluator.items import EvalItem, heldout_items, round_items
from producers.evaluator.judge import Judge
from producers.evaluator.loaders import load_benchmark
from producers.evaluator.outcomes import AccuracyRow, accuracy_rows, evaluate_items
from producers.evaluator.settings import BenchmarkSuite, EvaluatorConfig, EvaluatorSettings

log = logging.getLogger(__name__)

SERVICE = "evaluator"


def sample_for_version(items: Sequence[EvalItem], size: int | None, seed: int, policy_version: int) -> list[EvalItem]:
    """All items, or a fresh sample of `size` for this policy version (in file order), deterministic.

    Example:
        >>> sample_for_version(list(range(10)), 3, 0, 1) == sample_for_version(list(range(10)), 3, 0, 1)
        True
    """
    if size is None or size >= len(items):
        return list(items)
    chosen = sorted(random.Random(f"{seed}/{policy_version}").sample(range(len(items)), size))
    return [items[position] for position in chosen]


class Evaluator:
    """Evaluates checkpoints on the configured suites; benchmark files are read once, at start. With a `store`,
    the images of the failed items a `Diagnosis` quotes are put in it."""

    def __init__(self, settings: EvaluatorSettings, limits: ImageLimits, store: BlobStore | None = None,
                 versions: PolicyVersions | None = None) -> None:
        self.settings = settings
        self.store = store
        self.versions = versions or PolicyVersions(role=SERVICE)
        self.versions.check()  # a placement this machine cannot honour stops the service now
        self.judge = Judge(EndpointClient(settings.judge)) if settings.judge is not None else None
        self.heldout = heldout_items(settings.synthetic) if settings.synthetic is not None else []
        self.benchmarks = [(suite, self._load(suite, limits)) for suite in settings.benchmarks]

    def _load(self, suite: BenchmarkSuite, limits: ImageLimits) -> list[EvalItem]:
        loaded = load_benchmark(suite, self.settings.capabilities, limits)
        for reason, count in loaded.report.skipped.items():
            BENCHMARK_ROWS_SKIPPED.labels(suite.name, reason).inc(count)
        log.info("benchmark %s: %s", suite.name, loaded.report.summary())
        return loaded.items

    @property
    def suite_names(self) -> list[str]:
        """Names of every configured suite."""
        synthetic = self.settings.synthetic
        names = [synthetic.heldout_suite, synthetic.round_suite] if synthetic is not None else []
        return names + [suite.name for suite, _ in self.benchmarks]

    def items_for(self, policy_version: int, suites: Collection[str] | None = None) -> list[EvalItem]:
        """Every item policy version `policy_version` is evaluated on, suite by suite (only `suites` if given)."""
        items = list(self.heldout)
        if self.settings.synthetic is not None:
            items += round_items(self.settings.synthetic, policy_version)
        for suite, loaded in self.benchmarks:
            items += sample_for_version(loaded, suite.sample, suite.seed, policy_version)
        return [item for item in items if suites is None or item.suite in suites]

    def evaluate(self, uri: str, policy_version: int, suites: Collection[str] | None = None, *,
                 roots: Sequence[Path] | None = None) -> list[EvalOutcome]:
        """Open the checkpoint at `uri` (refused outside `roots`, see `load_checkpoint`; loaded here or served, see
        `PolicyVersions`) and evaluate it (blocking)."""
        started = time.perf_counter()
        policy = self.versions.open(uri, policy_version, roots=roots)
        outcomes = evaluate_items(
            policy,
            self.items_for(policy_version, suites),
            skills=self.settings.skills,
            judge=self.judge,
            max_new_tokens=self.settings.max_new_tokens,
            batch_size=self.settings.batch_size,
        )
        EVAL_SECONDS.observe(time.perf_counter() - started)
        return outcomes

    def diagnose(self, policy_version: int, outcomes: Sequence[EvalOutcome]) -> Diagnosis:
        """The agents' brief for `policy_version` from its outcomes (blocking: stores the failed items' images)."""
        synthetic = self.settings.synthetic
        return diagnose(self.items_for(policy_version), outcomes, policy_version=policy_version,
                        heldout_suite=synthetic.heldout_suite if synthetic is not None else "", store=self.store)


def summary_lines(rows: Sequence[AccuracyRow]) -> list[str]:
    """One line per (policy version, suite): overall accuracy, then each capability's.

    Example:
        >>> summary_lines([AccuracyRow(2, "heldout", "color", 3, 4), AccuracyRow(2, "heldout", "chart", 0, 4)])
        ['policy v2 heldout: 0.375 (3/8) | color 0.75 (3/4) chart 0.00 (0/4)']
    """
    groups: dict[tuple[int, str], list[AccuracyRow]] = {}
    for row in rows:
        groups.setdefault((row.policy_version, row.suite), []).append(row)
    lines = []
    for (version, suite), group in groups.items():
        correct, total = sum(r.correct for r in group), sum(r.total for r in group)
        parts = " ".join(f"{r.capability} {r.accuracy:.2f} ({r.correct}/{r.total})" for r in group)
        lines.append(f"policy v{version} {suite}: {correct / total:.3f} ({correct}/{total}) | {parts}")
    return lines


def record_summary(outcomes: Sequence[EvalOutcome]) -> list[AccuracyRow]:
    """Set the accuracy gauges, count the items, log the summary lines; returns the accuracy rows."""
    rows = accuracy_rows(outcomes)
    for row in rows:
        EVAL_ACCURACY.labels(row.capability, row.suite).set(row.accuracy)
        EVAL_POLICY_VERSION.labels(row.suite).set(row.policy_version)
        EVAL_ITEMS.labels(row.suite, "correct").inc(row.correct)
        EVAL_ITEMS.labels(row.suite, "wrong").inc(row.total - row.correct)
    for line in summary_lines(rows):
        log.info(line)
    return rows


async def publish_events(publisher: AsyncPublisher, events: Sequence[EvalOutcome | Diagnosis]) -> None:
    """Publish and wait for every acknowledgement; a bus failure is transient (nothing is committed)."""
    try:
        acknowledgements = [await publisher.publish(event) for event in events]
        await asyncio.gather(*acknowledgements)
    except KafkaError as error:
        raise TransientError(f"publishing {type(events[0]).__name__} events failed: {error}") from error


def checkpoint_handler(
    evaluator: Evaluator, publisher: AsyncPublisher, roots: Sequence[Path]
) -> Callable[[Delivery], Awaitable[None]]:
    """The handler of the checkpoints topic: evaluate in a worker thread (only checkpoints inside `roots`),
    publish the outcomes, then the version's `Diagnosis`, summarise."""

    async def on_checkpoint(delivery: Delivery) -> None:
        checkpoint: Checkpoint = delivery.event
        try:
            outcomes = await asyncio.to_thread(evaluator.evaluate, checkpoint.uri, checkpoint.policy_version,
                                               roots=roots)
        except EndpointFailure as failure:
            raise TransientError(f"the policy server gave no answers: {failure}") from failure
        await publish_events(publisher, outcomes)
        await publish_events(publisher, [await asyncio.to_thread(evaluator.diagnose, checkpoint.policy_version,
                                                                   outcomes)])
        record_summary(outcomes)

    return on_checkpoint


async def serve_evaluator(settings: EvaluatorConfig, stop: asyncio.Event, evaluator: Evaluator | None = None) -> None:
    """Follow the checkpoints topic until `stop` is set; commits after each checkpoint's outcomes are acknowledged."""
    evaluator = evaluator or Evaluator(settings.evaluator, settings.blob.limits,
                                       BlobStore(settings.blob.url, settings.blob.limits),
                                       PolicyVersions(settings.inference, settings.placement, SERVICE))
    async with AsyncPublisher(settings, producer_name=SERVICE) as publisher, AsyncSubscriber(
        settings, [Checkpoint], group_id=settings.evaluator.group_id, service=SERVICE, publisher=publisher
    ) as subscriber:
        await subscriber.run(checkpoint_handler(evaluator, publisher, allowed_roots(settings)), stop, max_records=1)
