"""`python -m benchmarks.warmup`: learning curves of warm-up recipes, as a tidy table and a plot."""

from __future__ import annotations

import json

from benchmarks.warmup import main
from dpe.world import CAPABILITIES


def test_learning_curves_are_measured_every_k_steps_per_recipe_and_capability(tmp_path, capsys):
    summary = main(["--recipe", "default", "--recipe", '{"mix": {"chart": 1}, "levels": [1]}',
                    "--steps", "4", "--every", "2", "--per-capability", "2", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "warmup_curves.json").read_text())
    assert set(data["recipes"]) == {"default", "recipe1"} == set(summary["recipes"]), "a named recipe, even empty"
    assert data["recipes"]["recipe1"]["config"]["mix"] == {"chart": 1.0}
    for recipe in data["recipes"]:
        rows = [row for row in data["rows"] if row["recipe"] == recipe]
        assert sorted({(row["step"], row["capability"]) for row in rows}) == sorted(
            (step, capability) for step in (2, 4) for capability in CAPABILITIES)
        assert all(0 <= row["accuracy"] <= 1 and row["items"] == 2 for row in rows)
        assert 0 <= data["recipes"][recipe]["image_dependence"] <= 1
    assert (tmp_path / "warmup_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == summary

    table = main(["--markdown", str(tmp_path / "warmup_curves.json")])["markdown"].splitlines()
    assert table[0].startswith("| recipe | image dependence |") and len(table) == 4
    assert [line.split(" | ")[0] for line in table[2:]] == ["| `default`", "| `recipe1`"]
