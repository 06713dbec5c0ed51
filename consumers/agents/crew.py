"""The crew: one unlabeled item and one capability in, one accepted or rejected candidate out.

An attempt runs the roles in order: planner (what to ask, which edits), retriever (related
images, only when the plan composes), editor (the edits, stored as a new blob), writer (question
and answer), then the quality-control chain (validator and independent answerer run inside it).
Every role's contribution is an `AgentStep`; a role that fails ends the attempt as a rejection
whose reason is ``<role>_<failure>`` (e.g. ``writer_not_applicable``, ``planner_invalid_output``).

A lead from the auditor (`Crew.rectify`, AuditDM's rectification) skips the planner, editor and writer: the
probe the target failed is the question, the references' consensus the answer (the ``writer`` step names the
auditor), and it goes through the same duplicate guard and QC chain; its sample's ``origin`` is ``audit``.

Attempts are deterministic for programmatic roles: the same (item, capability, attempt) gives the
same sample and so the same `sample_id` (a hash of image, question and answer), which is how a
redo after a crash is recognised (`Known`) instead of counted twice.

Example:
    >>> crew = Crew(roles, qc, store, ledger.plan_of, lambda: 0)          # doctest: +SKIP
    >>> outcome = await crew.attempt(await crew.context(item), "counting", plan_id, attempt=0)  # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from PIL import Image
from pydantic import ValidationError

from consumers.agents.retriever import SearchBackend
from consumers.qc.checks import Candidate, QCChain
from consumers.qc.dedup import DedupKey
from consumers.roles import AgentFailure, Answerer, Draft, ItemContext, Planner, TaskPlan, Validator, Writer, run_role
from dpe.blobstore import BlobError, BlobStore, ImageRejected
from dpe.events import (
    AcceptedSample,
    AgentStep,
    AuditLead,
    BlobRef,
    CapabilityDiagnosis,
    QCVerdict,
    RejectedSample,
    SampleBody,
    SampleOrigin,
    UnlabeledItem,
)
from dpe.imaging import Compose, ImageEditor, describe
from dpe.world import Scene
from monitoring.metrics import QC_CHECKS

INLINE_DECODE_BYTES = 64 * 1024
"""Images up to this encoded size are decoded in the event loop rather than in a thread."""


@dataclass(frozen=True)
class Roles:
    """The crew's members: four model-or-code roles and two tools (search backend, image editor)."""

    planner: Planner
    search: SearchBackend
    editor: ImageEditor
    writer: Writer
    validator: Validator
    answerer: Answerer

    @property
    def reads_answer_key(self) -> bool:
        """Whether a role is the benchmarks' fast path, which reads the synthetic world's scene from metadata."""
        roles = (self.planner, self.writer, self.validator, self.answerer)
        return any(role.backend == "programmatic" for role in roles)


@dataclass(frozen=True)
class Passed:
    """A candidate that passed every check; not yet published."""

    sample: AcceptedSample
    key: DedupKey


@dataclass(frozen=True)
class Failed:
    """A candidate that a role or a check refused."""

    sample: RejectedSample


@dataclass(frozen=True)
class Known:
    """The attempt rebuilt a sample already accepted under this plan (a redo after a restart)."""

    sample_id: str


Outcome = Passed | Failed | Known


def sample_id_for(body: SampleBody) -> str:
    """Content hash of a sample: image, question, answer, answer type, options and tolerance.

    Example:
        >>> ref = BlobRef(sha256="0" * 64, media_type="image/png", size_bytes=1, width=1, height=1)
        >>> len(sample_id_for(SampleBody(image=ref, question="q?", answer="1", answer_type="number")))
        64
    """
    content = {"image": body.image.sha256, "question": body.question, "answer": body.answer,
               "answer_type": body.answer_type, "options": body.options, "tolerance": body.tolerance}
    return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()


def candidate_id_for(plan_id: str, item_id: str, capability: str, attempt: int) -> str:
    """Deterministic id of one attempt (the key of its rejection, if any)."""
    return hashlib.sha256(f"{plan_id}/{item_id}/{capability}/{attempt}".encode()).hexdigest()


class Crew:
    """Runs attempts for (item, capability) pairs; see the module docstring."""

    def __init__(self, roles: Roles, qc: QCChain, store: BlobStore, accepted_plan: Callable[[str], str | None],
                 policy_version: Callable[[], int]):
        self.roles = roles
        self.qc = qc
        self.store = store
        self.accepted_plan = accepted_plan
        self.policy_version = policy_version

    async def context(self, item: UnlabeledItem, diagnoses: Mapping[str, CapabilityDiagnosis] | None = None
                      ) -> ItemContext:
        """Load the item's image (hash-checked), and its scene only for the fast path (`Roles.reads_answer_key`):
        pixel and model roles never see an item's metadata. `diagnoses` is the plan's brief per capability.
        Raises the blob store's errors.

        Small images are decoded in the event loop (a thread hand-off costs more than the work);
        larger ones in a worker thread.
        """
        if item.image.size_bytes <= INLINE_DECODE_BYTES:
            image = self.store.open_image(item.image)
        else:
            image = await asyncio.to_thread(self.store.open_image, item.image)
        scene = _answer_key(item) if self.roles.reads_answer_key else None
        ctx = ItemContext(item=item, image=image.convert("RGB"), scene=scene, diagnoses=diagnoses or {})
        self.roles.search.add(item, ctx.image)
        return ctx

    async def capabilities(self, ctx: ItemContext) -> frozenset[str] | None:
        """What the planner says this item can serve (None: anything may be tried); asked in a worker thread,
        as a planner that looks at the pixels takes a while."""
        try:
            return await asyncio.to_thread(self.roles.planner.capabilities, ctx)
        except Exception:  # noqa: BLE001 - metadata the planner cannot read serves nothing
            return frozenset()

    async def attempt(self, ctx: ItemContext, capability: str, plan_id: str, attempt: int) -> Outcome:
        """One candidate for `capability` from the item, through every role and check."""
        roles = self.roles
        steps: list[AgentStep] = []
        candidate_id = candidate_id_for(plan_id, ctx.item.item_id, capability, attempt)
        role = "planner"
        try:
            plan = await run_role(role, roles.planner.backend, roles.planner.plan(ctx, capability, attempt))
            aimed = f" (a {plan.kind} question, aimed by the diagnosis)" if plan.kind else ""
            steps.append(AgentStep(role="planner", backend=roles.planner.backend,
                                   detail=f"{capability}: {plan.focus}{aimed}"[:2000]))
            role = "editor"
            image, ref = await self._edit(ctx, plan, steps)
            role = "writer"
            writing = roles.writer.write(ctx, capability, plan, image, attempt)
            draft = await run_role(role, roles.writer.backend, writing)
            steps.append(AgentStep(role="writer", backend=roles.writer.backend, detail=f"attempt {attempt}"))
        except AgentFailure as failure:
            verdict = _refusal(role, f"{role}_{failure.reason_code}", failure.detail)
            return self._failed(Lineage(candidate_id, ctx, capability, plan_id), steps, [verdict], None)
        candidate = Candidate(ctx=ctx, capability=capability, plan=plan, image=image, draft=draft,
                              body=_body(ref, draft), steps=steps)
        return await self._checked(Lineage(candidate_id, ctx, capability, plan_id), candidate)

    async def rectify(self, lead: AuditLead, plan_id: str) -> Outcome:
        """A candidate from an audit lead (AuditDM's rectification): the probe the target failed, with the
        references' consensus as its answer, through the same duplicate guard and QC chain as the crew's own.

        The lead's image is read from the blob store (hash-checked; its errors raise). Its text is data: a question
        the QC chain's validator and answerer cannot read from the pixels is refused like any other.
        """
        divergence = lead.divergence
        item = UnlabeledItem(item_id=divergence.item_id, image=divergence.image, source=f"audit:{divergence.item_id}")
        image = (await asyncio.to_thread(self.store.open_image, divergence.image)).convert("RGB")
        ctx = ItemContext(item=item, image=image, scene=None)
        lineage = Lineage(candidate_id_for(plan_id, divergence.divergence_id, divergence.capability, 0), ctx,
                          divergence.capability, plan_id, divergence.divergence_id)
        agreeing = ", ".join(sorted(divergence.reference_answers))
        steps = [AgentStep(role="writer", backend="auditor", detail=(
            f"consensus {divergence.consensus_answer!r} ({divergence.consensus_strength:.2f} of {agreeing}); "
            f"policy v{divergence.policy_version} answered {divergence.target_answer!r}")[:2000])]
        try:
            if divergence.answer_type is None:
                raise ValueError("its divergence names no answer type (written before rectification)")
            draft = Draft(question=divergence.question, answer=divergence.consensus_answer,
                          answer_type=divergence.answer_type, options=divergence.options,
                          tolerance=divergence.tolerance)
        except ValueError as error:  # pydantic's ValidationError included
            verdict = _refusal("writer", "writer_invalid_output", f"the lead is no sample: {error}")
            return self._failed(lineage, steps, [verdict], None)
        candidate = Candidate(ctx=ctx, capability=divergence.capability, plan=TaskPlan(focus=divergence.capability),
                              image=image, draft=draft, body=_body(divergence.image, draft), steps=steps)
        return await self._checked(lineage, candidate)

    async def _checked(self, lineage: Lineage, candidate: Candidate) -> Outcome:
        """A drafted candidate through the duplicate guard and the QC chain: accepted, refused or already known."""
        sample_id = sample_id_for(candidate.body)
        first_plan = self.accepted_plan(sample_id)
        if first_plan == lineage.plan_id:
            return Known(sample_id)
        if first_plan is not None:
            detail = f"accepted before as {sample_id} under plan {first_plan}"
            verdict = _refusal("duplicate", "duplicate_sample", detail)
            return self._failed(lineage, candidate.steps, [verdict], candidate.body)
        verdicts = await self.qc.run(candidate)
        if all(verdict.passed for verdict in verdicts):
            accepted = AcceptedSample(
                producer="agents", sample_id=sample_id, capability=lineage.capability, body=candidate.body,
                source_item_id=lineage.ctx.item.item_id, plan_id=lineage.plan_id, agents=candidate.steps, qc=verdicts,
                policy_version=self.policy_version() if candidate.policy_version is None else candidate.policy_version,
                pass_rate=candidate.pass_rate, origin=lineage.origin, divergence_id=lineage.divergence_id,
            )
            return Passed(accepted, candidate.key())
        return self._failed(lineage, candidate.steps, verdicts, candidate.body, candidate.policy_version)

    async def _edit(self, ctx: ItemContext, plan: TaskPlan, steps: list[AgentStep]) -> tuple[Image.Image, BlobRef]:
        """Apply the plan's edits (retrieving related images for compositions) and store the result."""
        if not plan.edits:
            return ctx.image, ctx.item.image
        roles = self.roles
        refs: list[BlobRef] = []
        wanted = max((op.other + 1 for op in plan.edits if isinstance(op, Compose)), default=0)
        if wanted:
            refs = roles.search.search(ctx.item, ctx.image, wanted)
            if len(refs) < wanted:
                raise AgentFailure("failed", f"the retriever found {len(refs)} related images, {wanted} needed")
            steps.append(AgentStep(role="retriever", backend=roles.search.name, tools=[f"search.{roles.search.name}"],
                                   detail="related: " + ", ".join(ref.sha256 for ref in refs)))
        try:
            others = [await asyncio.to_thread(self.store.open_image, related) for related in refs]
            image = await asyncio.to_thread(roles.editor.apply, ctx.image, plan.edits, others)
            ref = await asyncio.to_thread(self._store_png, image)
        except (BlobError, ImageRejected, IndexError, ValueError, OSError) as exc:
            raise AgentFailure("failed", f"{type(exc).__name__}: {exc}"[:300]) from None
        steps.append(AgentStep(role="editor", backend=roles.editor.name, tools=describe(plan.edits),
                               detail=json.dumps([op.model_dump(mode="json") for op in plan.edits])[:2000]))
        return image, ref

    def _store_png(self, image: Image.Image) -> BlobRef:
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return self.store.put_image(buffer.getvalue())

    @staticmethod
    def _failed(lineage: Lineage, steps: list[AgentStep], verdicts: list[QCVerdict], body: SampleBody | None,
                policy_version: int | None = None) -> Failed:
        failed = next(verdict for verdict in verdicts if not verdict.passed)
        return Failed(RejectedSample(
            producer="agents", candidate_id=lineage.candidate_id, capability=lineage.capability, body=body,
            source_item_id=lineage.ctx.item.item_id, plan_id=lineage.plan_id, agents=steps, qc=verdicts,
            reason_code=failed.reason_code, policy_version=policy_version, origin=lineage.origin,
            divergence_id=lineage.divergence_id,
        ))


@dataclass(frozen=True)
class Lineage:
    """Where a candidate comes from: its attempt's id, the item (or audited image), capability, plan, and for a
    rectification the audit verdict it came from."""

    candidate_id: str
    ctx: ItemContext
    capability: str
    plan_id: str
    divergence_id: str | None = None

    @property
    def origin(self) -> SampleOrigin:
        return "agents" if self.divergence_id is None else "audit"


def _answer_key(item: UnlabeledItem) -> Scene | None:
    """The synthetic world's scene in the item's metadata (the fast path's answer key), or None."""
    try:
        return Scene.model_validate(item.metadata)
    except ValidationError:
        return None


def _refusal(check: str, reason: str, detail: str) -> QCVerdict:
    """A failed verdict from outside the QC chain (a role, the duplicate guard), counted like the chain's."""
    QC_CHECKS.labels(check, reason).inc()
    return QCVerdict(check=check, passed=False, reason_code=reason, detail=detail[:2000] or None)


def _body(ref: BlobRef, draft: Draft) -> SampleBody:
    return SampleBody(image=ref, question=draft.question, answer=draft.answer, answer_type=draft.answer_type,
                      options=draft.options, tolerance=draft.tolerance)
