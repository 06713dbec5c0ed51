"""`python -m benchmarks.grpo_transfer`: the trainer's engine on the world's right answers, graded on held-out items."""

from __future__ import annotations

import json

import pytest

from benchmarks.grpo_transfer import main
from dpe.policy.config import WarmupConfig
from dpe.policy.warmup import warm_up
from dpe.world import CAPABILITIES


def test_each_variant_is_graded_before_and_after_every_round_with_the_trainers_metrics(tmp_path, capsys):
    base = warm_up(WarmupConfig(steps=40), cache_dir=tmp_path / "models", show_progress=False,
                   measure_heldout=False).folder
    summary = main(["--base-model", str(base), "--variant", "default={}",
                    "--variant", 'colour={"mix": {"color": 1}, "grpo": {"learning_rate": 0.001}}',
                    "--variant", 'sft={"method": "sft", "sft": {"batch_size": 4}}',
                    "--rounds", "2", "--round-samples", "8", "--per-capability", "2", "--out", str(tmp_path)])
    result = json.loads((tmp_path / "grpo_transfer.json").read_text())
    assert set(result["variants"]) == {"default", "colour", "sft"} == set(summary["mean"])
    for variant in result["variants"]:
        rows = [row for row in result["rows"] if row["variant"] == variant]
        assert sorted({(row["round"], row["capability"]) for row in rows}) == sorted(
            (version, capability) for version in (0, 1, 2) for capability in CAPABILITIES)
        assert all(0 <= row["accuracy"] <= 1 and row["items"] == 2 for row in rows)
        metrics = [row for row in result["metrics"] if row["variant"] == variant]
        assert [row["round"] for row in metrics] == [1, 2]
        measured = "loss" if variant == "sft" else "kl"
        assert all(row[measured] is not None for row in metrics), metrics
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary

    table = main(["--markdown", str(tmp_path / "grpo_transfer.json")])["markdown"].splitlines()
    assert table[0].startswith("| variant | round |") and len(table) == 2 + 3 * 2

    with pytest.raises(SystemExit):
        main(["--variant", 'x={"method": "dpo"}'])
