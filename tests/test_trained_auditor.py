"""The trained auditor learns where the target is blind: the auditor model, taught the menu's format, trained by
GRPO through the trainer's own engine with `DivergenceReward`, asks more of the probes its target fails.

The target is a stand-in, not a model (`benchmarks.auditor.BlindTarget`): it answers as the `regions` toolchain reads
the pixels, except that it never answers a counting question, so its one blind spot is known. The references are the
default two toolchains."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks.auditor import GRPO, BlindTarget, main
from dpe.inference import LocalVersion
from dpe.policy.config import WarmupConfig
from dpe.policy.generation import SamplingParams
from dpe.policy.model import Policy, load_policy
from dpe.policy.warmup import warm_up
from dpe.world import generate_scene, render_scene
from producers.auditor.backends import ToolchainAnswerer
from producers.auditor.menu import AuditPrompt
from producers.auditor.prober import DivergenceReward, teach_menu
from trainer.engine import GRPOEngine
from trainer.settings import TrainerSettings

pytestmark = pytest.mark.slow

REFERENCES = [ToolchainAnswerer("regions", "regions"), ToolchainAnswerer("contours", "contours")]
COMPLETION = GRPO["max_completion_length"]


def shapes_prompts(count: int, start: int) -> list[AuditPrompt]:
    prompts = [AuditPrompt.of(render_scene(generate_scene("shapes", 1 + index % 2, seed=start + index)))
               for index in range(count)]
    return [prompt for prompt in prompts if prompt is not None]


def counting_share(policy: Policy, prompts: list[AuditPrompt]) -> tuple[float, float]:
    """The share of sampled choices that ask a counting question, and the share that name no probe."""
    policy.model.eval()
    params = SamplingParams(max_new_tokens=COMPLETION, temperature=1.0, num_samples=8)
    texts = LocalVersion(policy, 0).generate([prompt.image for prompt in prompts],
                                             [prompt.messages() for prompt in prompts], params, seed=0)
    policy.model.train()
    choices = [prompt.choice(text) for prompt, samples in zip(prompts, texts) for text in samples]
    return (sum(choice is not None and choice.kind.capability == "counting" for choice in choices) / len(choices),
            sum(choice is None for choice in choices) / len(choices))


@pytest.fixture(scope="module")
def quick_base(tmp_path_factory) -> Path:
    """A quickly warmed policy (40 SFT steps), the auditor model's start."""
    return warm_up(WarmupConfig(steps=40), cache_dir=tmp_path_factory.mktemp("models"), show_progress=False,
                   measure_heldout=False).folder


def test_grpo_moves_the_auditor_to_the_targets_blind_spot(tmp_path: Path, quick_base: Path):
    base = load_policy(quick_base)
    teach_menu(base, shapes_prompts(64, 0), steps=80)
    auditor = base.save(tmp_path / "auditor")
    settings = TrainerSettings(base_model=str(auditor), torch_threads=1, deepspeed={"enabled": False},
                               grpo={"preset": "tiny", **GRPO})
    engine = GRPOEngine(auditor, settings, tmp_path / "grpo",
                        rewards={DivergenceReward(BlindTarget("counting"), REFERENCES): 1.0})
    held_out = shapes_prompts(16, 1000)
    before, malformed_before = counting_share(engine.policy, held_out)
    rewards = [engine.train_round(shapes_prompts(24, 100 + 24 * number)).summary()["reward_mean"]
               for number in range(2)]
    after, malformed_after = counting_share(engine.policy, held_out)
    assert after >= before + 0.2, (before, after, rewards)
    assert malformed_after <= max(0.1, malformed_before), "the format holds"


def test_the_benchmark_compares_the_probers_at_one_probe_budget(tmp_path: Path, quick_base: Path, capsys):
    summary = main(["--seed", "0", "--images", "12", "--rounds", "1", "--train-images", "8", "--format-steps", "10",
                    "--base", str(quick_base), "--target", "stand-in:chart", "--out", str(tmp_path)])
    results = json.loads((tmp_path / "auditor.json").read_text())
    [seed] = results["seeds"]
    rows = {row["prober"]: row for row in seed["rows"]}
    assert set(rows) == {"fixed", "untrained", "trained"}
    budget = rows["fixed"]["probes"]
    assert rows["fixed"]["divergences"] > 0, "the fixed prober asks some chart questions"
    assert budget > 0 and all(row["probes"] == budget for row in rows.values()), "an equal probe budget"
    assert all(0 <= row["divergences"] <= budget for row in rows.values())
    assert all(name.count("/") == 3 for name in seed["failure_types"]), "capability/kind/edit/pattern"
    assert sum(seed["failure_types"].values()) == rows["trained"]["divergences"]
    assert [row["round"] for row in seed["rounds"]] == [1]
    assert summary["divergence_rate_ratio"] == pytest.approx(rows["trained"]["rate"] / rows["fixed"]["rate"])
    assert (tmp_path / "auditor.png").stat().st_size > 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary

    table = main(["--markdown", str(tmp_path / "auditor.json")])["markdown"]
    assert table.startswith("| seed | prober |") and "divergence_rate_ratio" in table
    with pytest.raises(SystemExit):
        main(["--target", "stand-in:juggling", "--base", str(quick_base), "--out", str(tmp_path)])
