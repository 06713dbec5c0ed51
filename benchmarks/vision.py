"""Does the tiny policy see shapes? What its vision tower can learn, against what the warm-up SFT teaches it.

Each label is "is there a <shape>" or "is there a <colour> shape" on the synthetic world's shape scenes
(levels 1-2). For every seed, a linear head on the max-pooled image tokens is trained on 6,000 scenes and
tested on 1,000 others, in two ways:

- `base probe`: the warmed base's vision tower frozen, only the head trained: what the warm-up SFT
  put into the image tokens;
- `tower trained`: a freshly initialised tower of the same shape trained with the head: what the tower can
  learn from the pixels at all.

The gap between the two, label by label, says whether the base is limited by what its tower can see or by
what SFT through the language model makes it learn. The majority share is the floor.

Writes ``<out>/vision.json`` (tidy rows: method, seed, label, accuracy; plus the majority share per label)
and prints the table (median and min-max over seeds).

Run: `python -m benchmarks.vision --seeds 3` (the default base is warmed and cached on first use;
`--base DIR` probes another checkpoint of the tiny family).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from rich.console import Console
from rich.table import Table

from dpe.policy.checkpoints import load_checkpoint
from dpe.policy.config import WarmupConfig
from dpe.policy.model import Policy, build_tiny_policy
from dpe.policy.warmup import warm_up
from dpe.world import render_scene
from dpe.world.palette import COLORS, SHAPES
from dpe.world.scene import Scene, generate_scene

LEVELS = (1, 2)
LABELS: tuple[str, ...] = (*(f"shape {shape}" for shape in SHAPES[:3]),
                           *(f"colour {color}" for color in list(COLORS)[:4]))
"""The shapes and colours that levels 1-2 draw."""
TRAIN_SCENES, TEST_SCENES, BATCH = 6000, 1000, 64


@dataclass(frozen=True)
class Scenes:
    """Rendered shape scenes and their labels (one column per `LABELS` entry)."""

    images: list[Image.Image]
    labels: torch.Tensor


def scenes(first_seed: int, count: int) -> Scenes:
    """`count` shape scenes from `first_seed` on, alternating levels 1 and 2.

    >>> batch = scenes(0, 4)
    >>> len(batch.images), tuple(batch.labels.shape)
    (4, (4, 7))
    """
    drawn = [generate_scene("shapes", LEVELS[i % len(LEVELS)], seed=first_seed + i) for i in range(count)]
    return Scenes([render_scene(scene) for scene in drawn], torch.tensor([present(scene) for scene in drawn]))


def present(scene: Scene) -> list[float]:
    """1.0 for each of `LABELS` the scene shows."""
    shapes, colors = {obj.shape for obj in scene.objects}, {obj.color for obj in scene.objects}
    return [float(label.split()[1] in (shapes if label.startswith("shape") else colors)) for label in LABELS]


class TowerHead(torch.nn.Module):
    """A policy's vision tower, max-pooled over its image tokens, and a linear head per label."""

    def __init__(self, policy: Policy, trainable: bool):
        super().__init__()
        self.processor = policy.processor.image_processor
        self.tower = policy.model.model.visual.requires_grad_(trainable)
        self.head = torch.nn.Linear(policy.model.config.text_config.hidden_size, len(LABELS))

    def forward(self, images: list[Image.Image]) -> torch.Tensor:
        batch = self.processor(images=images, return_tensors="pt")
        tokens = self.tower(batch["pixel_values"], grid_thw=batch["image_grid_thw"]).pooler_output
        return self.head(tokens.reshape(len(images), -1, tokens.shape[-1]).max(dim=1).values)


def accuracy(model: TowerHead, data: Scenes, steps: int, test: Scenes, seed: int) -> list[float]:
    """Train `model` (its trainable part) on `data` for `steps` batches; its accuracy per label on `test`."""
    rng = np.random.default_rng(seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.01)
    for _ in range(steps):
        picked = rng.integers(0, len(data.images), BATCH)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            model([data.images[i] for i in picked]), data.labels[picked])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        logits = torch.cat([model(test.images[i:i + 200]) for i in range(0, len(test.images), 200)])
    return ((logits > 0).float() == test.labels).float().mean(dim=0).tolist()


def run(base: Path, seeds: int, steps: int) -> dict[str, Any]:
    """Both methods for every seed: tidy rows, the majority share per label, seconds."""
    started = time.perf_counter()
    train, test = scenes(10_000, TRAIN_SCENES), scenes(50_000, TEST_SCENES)
    rows = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        methods = {"base probe": TowerHead(load_checkpoint(str(base)), trainable=False),
                   "tower trained": TowerHead(build_tiny_policy(WarmupConfig().model), trainable=True)}
        for method, model in methods.items():
            rows += [{"method": method, "seed": seed, "label": label, "accuracy": round(value, 4)}
                     for label, value in zip(LABELS, accuracy(model, train, steps, test, seed))]
    share = test.labels.mean(dim=0)
    majority = dict(zip(LABELS, torch.maximum(share, 1 - share).tolist()))
    return {"base": str(base), "steps": steps, "levels": list(LEVELS), "rows": rows,
            "majority": {label: round(value, 4) for label, value in majority.items()},
            "seconds": round(time.perf_counter() - started, 1)}


def print_result(result: dict[str, Any]) -> None:
    """Median (min-max over seeds) accuracy per method and label, under the majority share."""
    table = Table(title=f"is it in the image? test accuracy of a linear head on the image tokens ({result['base']})")
    table.add_column("method")
    for label in LABELS:
        table.add_column(label, justify="right")
    table.add_row("majority", *(f"{result['majority'][label]:.3f}" for label in LABELS))
    for method in dict.fromkeys(row["method"] for row in result["rows"]):
        cells = []
        for label in LABELS:
            values = [row["accuracy"] for row in result["rows"] if row["method"] == method and row["label"] == label]
            cells.append(f"{statistics.median(values):.3f} ({min(values):.2f}-{max(values):.2f})")
        table.add_row(method, *cells)
    Console(stderr=True, width=160).print(table)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", type=Path, default=None, help="A tiny-family checkpoint (default: the warmed base).")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=600, help="Training batches of 64 per head (and tower).")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("runs/vision"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    base = args.base or warm_up(WarmupConfig()).folder
    result = run(base, args.seeds, args.steps)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "vision.json").write_text(json.dumps(result, indent=1))
    print_result(result)
    print(json.dumps({"out": str(args.out / "vision.json"), "seconds": result["seconds"]}))
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
