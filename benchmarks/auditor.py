"""Does a trained auditor find more divergences than the fixed prober? AuditDM's measure, on the tiny family.

For each seed, on the same target and the same references (the auditor's default: two pixel toolchains). The target
is the warmed base policy, another checkpoint (``--target DIR``), or a stand-in that is no model (``--target
stand-in:counting``: a toolchain right wherever the references agree, blind to one capability, `BlindTarget`):

1. **fixed**: the divergence auditor as it runs in the spiral (`Auditor.audit`: the probe writer's questions about
   each image and its counterfactual edits) on ``--images`` unlabeled images; the probes it asks on each image are
   that image's budget;
2. **untrained**: the auditor model (a copy of the base policy taught the menu's answer format, letters drawn
   uniformly) asks that many distinct probes on each image, each a question and an edit with its parameters from the
   image's menus (`producers.auditor.menu`): the pairs it ranks highest (`rank_choices`: its probability of writing
   them), as a scorer with a budget asks its best few;
3. **trained**: the same model after ``--rounds`` GRPO micro-rounds of ``--train-images`` other unlabeled images
   each, through the trainer's own `GRPOEngine` with `DivergenceReward` as its only reward, asked the same way.

A probe that cannot be written (an edit the question writer cannot read, such as mirrored text), or budget the
image's menu cannot fill, is spent and finds nothing.
``divergence_rate``: divergences per probe; ``divergence_rate_ratio``: trained ÷ fixed, per seed, then the mean.
``failure_types``: distinct failure types (`producers.auditor.failures`) with at least 5 divergences among the
trained auditor's probes, over all seeds.

Writes ``<out>/auditor.json`` (tidy rows: seed, prober, probes, divergences, rate; per round the auditor's mean
reward; the failure types with counts and an exemplar question) and ``auditor.png`` beside it, and prints a table;
the last line of stdout is one JSON object. ``--markdown FILE`` prints the README's table of such a file.

Run: ``python -m benchmarks.auditor [--seed 0 --seed 1 --seed 2] [--rounds 6]``
"""

from __future__ import annotations

import argparse
import io
import json
import statistics
import tempfile
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
import torch
from PIL import Image
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from benchmarks._markdown import add_markdown_option, print_markdown
from dpe.blobstore import BlobStore, ImageLimits
from dpe.events import UnlabeledItem
from dpe.inference import PolicyVersions
from dpe.policy.config import WarmupConfig
from dpe.policy.model import Policy, load_policy
from dpe.policy.warmup import warm_up
from dpe.world import CAPABILITIES, render_scene, unlabeled_scene
from producers.auditor.backends import PolicyAnswerer, ProbeAnswerer, ToolchainAnswerer, View, reference_answerer
from producers.auditor.menu import AuditPrompt, Choice
from producers.auditor.prober import DivergenceReward, Verdict, rank_choices, teach_menu
from producers.auditor.probes import Probe
from producers.auditor.service import Auditor
from producers.auditor.settings import AuditorSettings

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend

PROBERS = ("fixed", "untrained", "trained")
STAND_IN = "stand-in:"
MIN_EXEMPLARS = 5
"""Divergences a failure type needs to count as discovered."""
GRPO = {"group_size": 8, "prompts_per_step": 8, "kl_coef": 0.01, "max_completion_length": 10, "temperature": 1.0}
"""The auditor model's GRPO settings (over the ``tiny`` preset: learning rate 3e-4; at 1e-3 the two-letter answer
format collapses within a round)."""


class BlindTarget:
    """A stand-in target (not a model): answers as the `regions` toolchain reads the pixels, except that it never
    answers a question about `blind_to`. A target right on most probes with one known blind spot, the setting AuditDM
    measures in; the tiny policies are wrong on most probes of every capability.

    >>> BlindTarget("counting").name
    'stand-in:counting'
    """

    def __init__(self, blind_to: str) -> None:
        self.name = f"{STAND_IN}{blind_to}"
        self.blind_to = blind_to
        self.eyes = ToolchainAnswerer("regions", "regions")

    def answer(self, asked: Sequence[tuple[View, Probe]]) -> list[str | None]:
        seen = self.eyes.answer(asked)
        return [None if probe.capability == self.blind_to else text for (_, probe), text in zip(asked, seen)]


def warmed_base() -> Path:
    """The default base policy (warmed once, then cached)."""
    return warm_up(WarmupConfig(), show_progress=False).folder


def target_answerer(target: str, max_new_tokens: int) -> ProbeAnswerer:
    """The target `--target` names: ``stand-in:CAPABILITY`` (`BlindTarget`), else a checkpoint folder (default: the
    warmed base)."""
    if target.startswith(STAND_IN):
        blind_to = target.removeprefix(STAND_IN)
        if blind_to not in CAPABILITIES:
            raise SystemExit(f"unknown capability {blind_to!r}; known: {', '.join(CAPABILITIES)}")
        return BlindTarget(blind_to)
    return PolicyAnswerer("target", PolicyVersions().open(target or str(warmed_base()), 0), max_new_tokens)


def images(seed: int, count: int, start: int = 0) -> list[Image.Image]:
    """Unlabeled images of the synthetic world (its own seed: disjoint from the spiral's)."""
    return [render_scene(unlabeled_scene(index, seed)) for index in range(start, start + count)]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def fixed_prober(auditor: Auditor, target: ProbeAnswerer, pictures: list[Image.Image]) -> dict[str, Any]:
    """The spiral's auditor on each image: probes asked (in all and per image), divergences and their failure types."""
    per_image, found = [], Counter()
    for picture in pictures:
        ref = auditor.store.put_image(png(picture))
        item = UnlabeledItem(producer="benchmark", item_id=ref.sha256, image=ref, source="benchmark")
        per_image.append(len(auditor.questions(item)))
        found.update(verdict.failure_type for verdict in auditor.audit(item, target, 0) if verdict.diverged)
    return {"probes": sum(per_image), "per_image": per_image, "divergences": sum(found.values()),
            "failure_types": found}


def menu_prober(policy: Policy, reward: DivergenceReward, pictures: list[Image.Image], budgets: list[int],
                probe_writer: str) -> tuple[dict[str, Any], list[Verdict]]:
    """The auditor model's probes: on each image as many distinct (question, edit) choices as its budget, its best
    ranked (`rank_choices`). Budget beyond the menus, and that of an image the probe writer sees nothing in, is spent
    and finds nothing."""
    prompts = [AuditPrompt.of(picture, probe_writer) for picture in pictures]
    asked = [(prompt, budget) for prompt, budget in zip(prompts, budgets, strict=True) if prompt and budget]
    chosen: list[tuple[Choice | None, Image.Image]] = []
    for (prompt, budget), ranked in zip(asked, rank_choices(policy, [prompt for prompt, _ in asked]), strict=True):
        best = list(ranked[:budget])
        chosen += [(choice, prompt.image) for choice in best] + [(None, prompt.image)] * (budget - len(best))
    verdicts = reward.judge([choice for choice, _ in chosen], [picture for _, picture in chosen])
    found = Counter(verdict.failure_type for verdict in verdicts if verdict.diverged)
    return {"probes": sum(budgets), "divergences": sum(found.values()), "failure_types": found}, verdicts


def prompts_of(pictures: list[Image.Image], probe_writer: str) -> list[AuditPrompt]:
    """The auditor model's prompts for the images its probe writer sees something in."""
    return [prompt for picture in pictures if (prompt := AuditPrompt.of(picture, probe_writer)) is not None]


def run_seed(seed: int, base: Path, target: ProbeAnswerer, args: argparse.Namespace, progress: Progress,
             base_folder: Path) -> dict:
    """One seed: the fixed prober, then the auditor model (the base taught the menu's format, `teach_menu`) before
    and after its GRPO rounds."""
    from trainer.engine import GRPOEngine
    from trainer.settings import TrainerSettings

    torch.manual_seed(seed)
    settings = AuditorSettings(seed=seed)
    references = [reference_answerer(reference, settings.max_new_tokens) for reference in settings.references]
    store = BlobStore(tempfile.mkdtemp(prefix="auditor-bench-"), ImageLimits())
    held_out = images(1000 + seed, args.images)
    fixed = fixed_prober(Auditor(settings, store, references), target, held_out)
    reward = DivergenceReward(target, references, settings)
    auditor_model = base_folder / f"auditor-{seed}"
    policy = load_policy(base)
    teach_menu(policy, prompts_of(images(3000 + seed, 200), settings.probe_writer), steps=args.format_steps,
               seed=seed)
    policy.save(auditor_model)
    trainer = TrainerSettings(base_model=str(auditor_model), torch_threads=1, deepspeed={"enabled": False},
                              grpo={"preset": "tiny", **GRPO, "seed": seed}, staleness={"max_versions": None})
    engine = GRPOEngine(auditor_model, trainer, Path(tempfile.mkdtemp(prefix="auditor-grpo-")),
                        rewards={reward: 1.0})
    untrained, _ = menu_prober(engine.policy, reward, held_out, fixed["per_image"], settings.probe_writer)
    rounds = []
    task = progress.add_task(f"seed {seed}: GRPO rounds", total=args.rounds)
    for number in range(1, args.rounds + 1):
        prompts = prompts_of(images(2000 + seed, args.train_images, start=(number - 1) * args.train_images),
                             settings.probe_writer)
        summary = engine.train_round(prompts).summary()
        rounds.append({"seed": seed, "round": number, "reward_mean": summary.get("reward_mean"),
                       "kl": summary.get("kl")})
        progress.advance(task)
    trained, verdicts = menu_prober(engine.policy, reward, held_out, fixed["per_image"], settings.probe_writer)
    kinds = Counter(verdict.choice.key if verdict.choice else "none" for verdict in verdicts)
    rows = [{"seed": seed, "prober": name, "probes": result["probes"], "divergences": result["divergences"],
             "rate": result["divergences"] / result["probes"] if result["probes"] else 0.0}
            for name, result in (("fixed", fixed), ("untrained", untrained), ("trained", trained))]
    exemplars = {verdict.failure_type: verdict.probe.question for verdict in verdicts if verdict.diverged}
    return {"rows": rows, "rounds": rounds, "failure_types": dict(trained["failure_types"]),
            "exemplars": exemplars, "trained_kinds": dict(kinds.most_common(8))}


def summarise(seeds: list[dict]) -> dict[str, Any]:
    """The headline numbers over seeds: mean rates, the ratios to the fixed prober's (over the seeds where it found
    any divergence; 0 where it found none in any), failure types with enough divergences."""
    rate = {name: [row["rate"] for result in seeds for row in result["rows"] if row["prober"] == name]
            for name in PROBERS}

    def ratios(name: str) -> list[float]:
        return [mine / fixed for mine, fixed in zip(rate[name], rate["fixed"], strict=True) if fixed]

    counts: Counter = Counter()
    for result in seeds:
        counts.update(result["failure_types"])
    discovered = {name: count for name, count in counts.most_common() if count >= MIN_EXEMPLARS}
    return {
        "divergence_rate_ratio": statistics.fmean(ratios("trained") or [0.0]),
        "ratio_min": min(ratios("trained"), default=0.0), "ratio_max": max(ratios("trained"), default=0.0),
        "untrained_ratio": statistics.fmean(ratios("untrained") or [0.0]),
        **{f"{name}_rate": statistics.fmean(values) for name, values in rate.items()},
        "failure_types": len(discovered), "discovered": discovered, "seeds": len(seeds),
    }


def plot(results: dict[str, Any], path: Path) -> None:
    """Divergences per probe by prober (a dot per seed), the auditor's mean reward per round, its failure types."""
    fig, (rates, rewards, types) = plt.subplots(1, 3, figsize=(14, 3.8), dpi=100, width_ratios=(1, 1, 1.6))
    for position, name in enumerate(PROBERS):
        values = [row["rate"] for result in results["seeds"] for row in result["rows"] if row["prober"] == name]
        rates.bar(position, statistics.fmean(values), color="lightgrey")
        rates.scatter([position] * len(values), values, color="black", s=12, zorder=3)
    rates.set_xticks(range(len(PROBERS)), PROBERS)
    rates.set_ylabel("divergences per probe")
    rates.set_title("equal probe budget per image")
    for result in results["seeds"]:
        rewards.plot([row["round"] for row in result["rounds"]], [row["reward_mean"] for row in result["rounds"]],
                     marker=".", label=f"seed {result['rows'][0]['seed']}")
    rewards.set_xlabel("GRPO round")
    rewards.set_ylabel("auditor's mean reward")
    rewards.legend(fontsize="x-small")
    discovered = results["summary"]["discovered"]
    names = list(discovered)[:12][::-1]
    types.barh(names, [discovered[name] for name in names], color="tab:red")
    types.tick_params(axis="y", labelsize="x-small")
    types.set_xlabel(f"trained auditor's divergences (types with ≥ {MIN_EXEMPLARS})")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def markdown(results: dict[str, Any]) -> str:
    """The README's table: per seed and prober, probes, divergences and rate; the ratio last."""
    lines = ["| seed | prober | probes | divergences | divergences per probe |", "| --- | --- | --- | --- | --- |"]
    for result in results["seeds"]:
        for row in result["rows"]:
            lines.append(f"| {row['seed']} | {row['prober']} | {row['probes']} | {row['divergences']} | "
                         f"{row['rate']:.3f} |")
    summary = results["summary"]
    lines.append(f"\ndivergence_rate_ratio (trained ÷ fixed, mean of {summary['seeds']} seeds): "
                 f"**{summary['divergence_rate_ratio']:.2f}** (min {summary['ratio_min']:.2f}, max "
                 f"{summary['ratio_max']:.2f}); untrained ÷ fixed {summary['untrained_ratio']:.2f}; failure types "
                 f"with ≥ {MIN_EXEMPLARS} divergences: **{summary['failure_types']}**")
    return "\n".join(lines)


def print_results(results: dict[str, Any]) -> None:
    table = Table(title="divergences per probe, at the fixed prober's probe budget on each image")
    for column in ("seed", "prober", "probes", "divergences", "rate"):
        table.add_column(column, justify="right")
    for result in results["seeds"]:
        for row in result["rows"]:
            table.add_row(str(row["seed"]), row["prober"], str(row["probes"]), str(row["divergences"]),
                          f"{row['rate']:.3f}")
    console = Console(stderr=True)
    console.print(table)
    summary = results["summary"]
    console.print(f"ratio trained/fixed {summary['divergence_rate_ratio']:.2f} (goal ≥ 2); failure types with ≥ "
                  f"{MIN_EXEMPLARS} divergences: {summary['failure_types']}")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run the benchmark (or print a results file's table); returns the JSON object printed last."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, action="append", dest="seeds", help="Repeat for more (default 0 1 2).")
    parser.add_argument("--images", type=int, default=60, help="Held-out images both probers audit.")
    parser.add_argument("--train-images", type=int, default=64, help="Images per GRPO round of the auditor model.")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--format-steps", type=int, default=120, help="SFT steps teaching the menu's format.")
    parser.add_argument("--target", default="", help="Target checkpoint folder (default: the warmed base), or "
                        "stand-in:CAPABILITY, a toolchain that never answers about CAPABILITY (not a model).")
    parser.add_argument("--base", type=Path, default=None, help="Auditor model's start (default: the warmed base).")
    parser.add_argument("--out", type=Path, default=Path("docs/auditor"))
    add_markdown_option(parser, "auditor.json")
    args = parser.parse_args(argv)
    if args.markdown:
        return print_markdown(args.markdown, markdown)
    torch.set_num_threads(1)
    base = args.base or warmed_base()
    target = target_answerer(args.target, AuditorSettings().max_new_tokens)
    with Progress(console=Console(stderr=True)) as progress:
        with tempfile.TemporaryDirectory(prefix="auditor-models-") as models:
            seeds = [run_seed(seed, base, target, args, progress, Path(models)) for seed in args.seeds or [0, 1, 2]]
    results = {"base": str(base), "target": args.target or str(warmed_base()), "grpo": GRPO, "rounds": args.rounds,
               "images": args.images, "train_images": args.train_images, "seeds": seeds, "summary": summarise(seeds)}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "auditor.json").write_text(json.dumps(results, indent=1, default=str))
    plot(results, args.out / "auditor.png")
    print_results(results)
    summary = {name: value for name, value in results["summary"].items() if name != "discovered"}
    print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
