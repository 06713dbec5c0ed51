"""Pixel agents: roles that see only the image (and the plan), read through two independent toolchains.

They stand in on CPU for the VLM roles a production deployment runs behind an endpoint; one crew
runs either. No role here reads an item's metadata or the synthetic world's scene: each role
*perceives* the image with a `dpe.perception.Toolchain` and works on what it saw.

- `PixelPlanner` is the image analyst and planner: the capabilities an image can exercise are
  those the writer's toolchain can write a question for (`agents.questions` says which of the world's
  questions serve each capability of the taxonomy: a DPE image type such as ``geometric`` is served by
  shape questions, the world's own capabilities by theirs), and with probability `edit_rate` the plan
  adds an edit that leaves the image readable (`PIXEL_EDITS`: right-angle turns, mirrors, zoom-out,
  grayscale for text), drawn from a seed of (item, capability, attempt) so that a redo is identical.
  It reads the diagnosis: the plan asks mostly for the kinds of question the policy failed
  (`consumers.agents.programmatic.aimed_kind`).
- `PixelWriter` perceives the *edited* image with its toolchain and writes the world's question for
  the capability about what it saw (`dpe.world.write_question` on the perceived scene), of the planned kind.
- `PixelValidator` perceives the edited image with the *other* toolchain: the question is
  answerable when that view supports the capability and its content is large enough to see.
- `PixelAnswerer` answers with the other toolchain, never seeing the written answer: the crew's
  agreement check accepts a sample only when the two toolchains give the same answer.

Example:
    >>> import asyncio
    >>> from dpe.world import generate_scene, render_scene
    >>> from consumers.roles import ItemContext, TaskPlan
    >>> scene = generate_scene("formula", 1, seed=3)
    >>> ctx = ItemContext(item=None, image=render_scene(scene), scene=None)
    >>> draft = asyncio.run(PixelWriter("regions").write(ctx, "arithmetic", TaskPlan(), ctx.image, 0))
    >>> draft.answer == str(scene.formula.value())
    True
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence

from PIL import Image

from consumers.agents.programmatic import (
    SAFE_EDITS,
    edit_plan,
    seed_of,
    served,
    visibility,
    world_capability,
    written_capability,
)
from consumers.agents.settings import WORLD_QUESTIONS
from consumers.roles import AgentFailure, AnswererQuestion, Draft, ItemContext, TaskPlan, Verdict
from dpe.perception import NotPerceived
from dpe.perception.pool import perceiving_in_processes
from dpe.perception.toolchain import TOOLCHAINS, Toolchain
from dpe.world import QuestionNotPossible, Scene, scene_capabilities, write_question
from dpe.world.answers import NotAnswerable, answer_question

PIXEL_EDITS: dict[str, tuple[str, ...]] = {
    capability: tuple(edit for edit in edits if edit != "compose") for capability, edits in SAFE_EDITS.items()
}
"""Edits a pixel plan may make: those that keep the answer, except composition (two images read as one)."""


@contextlib.asynccontextmanager
async def perceiving(processes: int) -> AsyncIterator[None]:
    """While inside, the pixel roles read images in `processes` warmed worker processes (`agents.toolchains.processes`;
    0 reads in this process's threads)."""
    if not processes:
        yield
        return
    with contextlib.ExitStack() as stack:
        await asyncio.to_thread(stack.enter_context, perceiving_in_processes(processes))
        try:
            yield
        finally:
            await asyncio.to_thread(stack.close)


async def perceived(toolchain: Toolchain, image: Image.Image) -> Scene:
    """What `toolchain` sees in `image` (read in a worker thread: OCR takes a while); a failure to see
    becomes the role's ``not_perceived`` failure."""
    try:
        return await asyncio.to_thread(toolchain.perceive, image)
    except NotPerceived as exc:
        raise AgentFailure("not_perceived", str(exc)) from None


class PixelPlanner:
    """Analyses the image with the writer's toolchain and plans a question, with an edit now and then."""

    backend = "pixels"

    def __init__(self, toolchain: str = "regions", edit_rate: float = 0.25,
                 questions: Mapping[str, Sequence[str]] = WORLD_QUESTIONS):
        self.toolchain = TOOLCHAINS[toolchain]
        self.edit_rate = edit_rate
        self.questions = questions

    def capabilities(self, ctx: ItemContext) -> frozenset[str]:
        try:
            return served(self.questions, scene_capabilities(self.toolchain.perceive(ctx.image)))
        except NotPerceived:
            return frozenset()

    async def plan(self, ctx: ItemContext, capability: str, attempt: int) -> TaskPlan:
        seen = scene_capabilities(await perceived(self.toolchain, ctx.image))
        asked = world_capability(ctx.item.item_id, capability, attempt, self.questions, seen)
        return edit_plan(ctx.item.item_id, asked, attempt, self.edit_rate, PIXEL_EDITS, ctx.diagnoses.get(capability))


class PixelWriter:
    """Writes the world's question for the capability about what its toolchain sees in the edited image."""

    backend = "pixels"

    def __init__(self, toolchain: str = "regions"):
        self.toolchain = TOOLCHAINS[toolchain]

    async def write(self, ctx: ItemContext, capability: str, plan: TaskPlan, image: Image.Image, attempt: int) -> Draft:
        item_id = ctx.item.item_id if ctx.item is not None else ""
        try:
            question = write_question(await perceived(self.toolchain, image), written_capability(plan, capability),
                                      seed=seed_of(item_id, capability, attempt, "write"), kind=plan.kind or None)
        except QuestionNotPossible as exc:
            raise AgentFailure("not_applicable", str(exc)) from None
        return Draft(question=question.question, answer=question.answer, answer_type=question.answer_type,
                     options=list(question.options) if question.options else None, tolerance=question.tolerance)


class PixelValidator:
    """Checks with the other toolchain that the edited image supports the capability and shows its content."""

    backend = "pixels"

    def __init__(self, toolchain: str = "contours"):
        self.toolchain = TOOLCHAINS[toolchain]

    async def validate(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, draft: Draft) -> Verdict:
        try:
            scene = await perceived(self.toolchain, image)
        except AgentFailure as exc:
            return Verdict(answerable=False, reason=f"the {self.toolchain.name} toolchain sees nothing: {exc}"[:300])
        if plan.focus and plan.focus not in scene_capabilities(scene):
            return Verdict(answerable=False, reason=f"the {self.toolchain.name} toolchain sees no {plan.focus} content")
        return visibility(scene, 1.0)


class PixelAnswerer:
    """Answers from what the other toolchain sees, with the world's template reader (`dpe.world.answers`)."""

    backend = "pixels"

    def __init__(self, toolchain: str = "contours"):
        self.toolchain = TOOLCHAINS[toolchain]

    async def answer(self, ctx: ItemContext, plan: TaskPlan, image: Image.Image, question: AnswererQuestion) -> str:
        scene = await perceived(self.toolchain, image)
        try:
            return answer_question(scene, question.question, question.options)
        except NotAnswerable as exc:
            raise AgentFailure("not_applicable", str(exc)) from None
