"""The synthetic capability world: procedurally drawn images with verifiable questions.

Seven capabilities (`CAPABILITIES`) over four scene kinds, each with difficulty levels 1-5, and
three disjoint draws: `diagnostic_sample` (held out), `training_stream` and `unlabeled_scene`
(metadata that programmatic agents turn into questions with `write_question`).

Example:
    >>> from dpe.world import CAPABILITIES, make_item
    >>> sorted({make_item(c, 1, 0).answer_type for c in CAPABILITIES})
    ['choice', 'number', 'text', 'yes_no']
"""

from dpe.world.items import (
    DIAGNOSTIC_POOL_SIZE,
    WorldItem,
    diagnostic_sample,
    image_sha256,
    make_item,
    training_stream,
    scene_of_source,
    synthetic_source,
    unlabeled_scene,
)
from dpe.world.knobs import DIFFICULTY_LEVELS, Knobs, knobs_for
from dpe.world.questions import (
    CAPABILITIES,
    QUESTION_KINDS,
    SCENE_KIND_OF,
    Capability,
    Question,
    QuestionNotPossible,
    question_kind,
    scene_capabilities,
    write_question,
)
from dpe.world.render import render_scene
from dpe.world.scene import SCENE_KINDS, Scene, SceneKind, generate_scene
from dpe.world.seeds import NAMESPACES, Namespace, derive_seed, seed_namespace

__all__ = [
    "CAPABILITIES",
    "DIAGNOSTIC_POOL_SIZE",
    "DIFFICULTY_LEVELS",
    "NAMESPACES",
    "QUESTION_KINDS",
    "SCENE_KINDS",
    "SCENE_KIND_OF",
    "Capability",
    "Knobs",
    "Namespace",
    "Question",
    "QuestionNotPossible",
    "Scene",
    "SceneKind",
    "WorldItem",
    "derive_seed",
    "diagnostic_sample",
    "generate_scene",
    "image_sha256",
    "knobs_for",
    "make_item",
    "question_kind",
    "render_scene",
    "scene_capabilities",
    "seed_namespace",
    "training_stream",
    "scene_of_source",
    "synthetic_source",
    "unlabeled_scene",
    "write_question",
]
