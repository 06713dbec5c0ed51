"""Counterfactual views of an item (AuditDM): pixel edits made with the agents' image editor.

For a synthetic scene each edit also yields the edited scene, so the oracle can answer about the
counterfactual exactly:

- ``mirror``: flip left-right; left/right relations swap, everything else stays (shapes are
  symmetric about the vertical axis; a chart keeps its values, so its answers must not change);
- ``remove-<colour>-<shape>``: occlude one object's box with the background colour (only objects
  whose box touches no other object); counts drop, existence flips, the colour question may go.

Text and formula scenes get no edits (a mirrored word is no longer that word). Images without
scene metadata get the generic edits (mirror, grayscale) with no scene: only model references can
answer about those.

Example:
    >>> from dpe.imaging import PillowEditor
    >>> from dpe.world import generate_scene, render_scene
    >>> scene = generate_scene("shapes", 2, seed=3)
    >>> views = counterfactuals(View("item", render_scene(scene), scene), PillowEditor(), count=2)
    >>> [(v.item_id, len(v.scene.objects) - len(scene.objects)) for v in views]
    [('item/cf/mirror', 0), ('item/cf/remove-blue-square', -1)]
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from dpe.imaging import Box, Crop, EditOp, Flip, ImageEditor, Occlude, OverlayText, Recolor
from dpe.world import Scene
from dpe.world.scene import SceneObject
from producers.auditor.backends import View

_MARGIN = 1


@dataclass(frozen=True)
class Counterfactual:
    """An edit to make: a short key (part of the view's id), what it does, the operations, the edited scene."""

    key: str
    description: str
    ops: tuple[EditOp, ...]
    scene: Scene | None


def _bounds(obj: SceneObject) -> tuple[int, int, int, int]:
    """Pixels an object may cover, as a half-open box with a margin."""
    reach = obj.size + _MARGIN
    return obj.x - reach, obj.y - reach, obj.x + reach + 1, obj.y + reach + 1


def _overlaps(a: tuple[int, int, int, int], b: tuple[int, int, int, int]) -> bool:
    return a[0] < b[2] and b[0] < a[2] and a[1] < b[3] and b[1] < a[3]


def _fraction(value: int, side: int) -> float:
    return min(1.0, max(0.0, value / side))


def removal(scene: Scene, obj: SceneObject) -> Counterfactual:
    """Occlude `obj` with the background: the scene without it."""
    left, top, right, bottom = _bounds(obj)
    box = Box(left=_fraction(left, scene.width), top=_fraction(top, scene.height),
              right=_fraction(right, scene.width), bottom=_fraction(bottom, scene.height))
    edited = scene.model_copy(update={"objects": [other for other in scene.objects if other != obj]})
    description = f"remove the {obj.name} (painted over with the background)"
    return Counterfactual(f"remove-{obj.color}-{obj.shape}", description, (Occlude(box=box, color=scene.background),),
                          edited)


def mirror(scene: Scene | None) -> Counterfactual:
    """Flip left-right: objects move to mirrored x positions; a chart's values do not change."""
    edited = None
    if scene is not None:
        objects = [obj.model_copy(update={"x": scene.width - 1 - obj.x}) for obj in scene.objects]
        edited = scene.model_copy(update={"objects": objects})
    return Counterfactual("mirror", "mirror the image left-right", (Flip(axis="horizontal"),), edited)


def removable(scene: Scene) -> list[SceneObject]:
    """The objects a removal can paint over exactly: those whose box touches no other object's (none alone)."""
    return [obj for obj in scene.objects if len(scene.objects) > 1
            and not any(_overlaps(_bounds(obj), _bounds(other)) for other in scene.objects if other is not obj)]


def scene_counterfactuals(scene: Scene) -> list[Counterfactual]:
    """The exact edits a scene allows: the mirror first, then one removal per removable object."""
    if scene.kind == "chart":
        return [mirror(scene)]
    if scene.kind != "shapes":
        return []
    return [mirror(scene)] + [removal(scene, obj) for obj in removable(scene)]


QUARTERS: dict[str, Box] = {
    "top-left": Box(right=0.5, bottom=0.5), "top-right": Box(left=0.5, bottom=0.5),
    "bottom-left": Box(right=0.5, top=0.5), "bottom-right": Box(left=0.5, top=0.5),
}
HALVES: dict[str, Box] = {"left": Box(right=0.5), "right": Box(left=0.5)}
OVERWRITES = ("STOP", "42")
"""Texts the toolbox can write over an image (a text to read where there was another, a number among counts)."""
MAX_REMOVALS = 6
"""Removals offered per image, so that a toolbox fits the 26 letters of a menu."""


def toolbox(scene: Scene) -> tuple[Counterfactual, ...]:
    """Every edit the auditor model may pick for an image whose probe writer saw `scene`, parameters included: as it
    is, mirrored, colours changed (red and blue swapped, grayscale), one object removed (which one: each removable
    object the scene shows), a quarter covered (which), zoomed to a half (which), a text written over it (which).
    The edited scenes are not kept: the probe writer reads each edited image again.

    Example:
        >>> from dpe.world import generate_scene
        >>> [edit.key for edit in toolbox(generate_scene("shapes", 2, seed=3))][:6]
        ['none', 'mirror', 'redblue', 'grayscale', 'remove-blue-square', 'remove-red-triangle']
    """
    kept = [
        Counterfactual("none", "as it is", (), None),
        Counterfactual("mirror", "mirrored left-right", (Flip(axis="horizontal"),), None),
        Counterfactual("redblue", "red and blue swapped", (Recolor(mode="swap_red_blue"),), None),
        Counterfactual("grayscale", "in grayscale", (Recolor(mode="grayscale"),), None),
        *(removal(scene, obj) for obj in removable(scene)[:MAX_REMOVALS]),
        *(Counterfactual(f"occlude-{name}", f"its {name} quarter covered in grey", (Occlude(box=box),), None)
          for name, box in QUARTERS.items()),
        *(Counterfactual(f"crop-{name}", f"zoomed to its {name} half", (Crop(box=box),), None)
          for name, box in HALVES.items()),
        *(Counterfactual(f"overwrite-{text.lower()}", f"'{text}' written over its middle",
                         (OverlayText(text=text, x=0.3, y=0.4, size=0.2),), None) for text in OVERWRITES),
    ]
    return tuple(replace(edit, scene=None) for edit in kept)


GENERIC_COUNTERFACTUALS: tuple[Counterfactual, ...] = (
    mirror(None),
    Counterfactual("grayscale", "remove the colours (grayscale)", (Recolor(mode="grayscale"),), None),
)


def counterfactuals(view: View, editor: ImageEditor, *, count: int) -> list[View]:
    """Up to `count` counterfactual views of an item's own view, made with `editor`."""
    chosen = scene_counterfactuals(view.scene) if view.scene is not None else GENERIC_COUNTERFACTUALS
    return [
        View(
            item_id=f"{view.item_id}/cf/{edit.key}",
            image=editor.apply(view.image, edit.ops),
            scene=edit.scene,
            edit=edit.description,
            counterfactual_of=view.item_id,
        )
        for edit in chosen[:count]
    ]
