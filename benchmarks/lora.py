"""The trainer with and without LoRA on a released architecture: peak memory, step time, checkpoint size.

Each side runs the trainer's `GRPOEngine` in a fresh process (peak memory is a process's own) on the same
random-weight model of a published shape (`dpe.policy.architectures`, reduced depth on CPU), the same samples and
the same GRPO settings (the ``paper`` preset the trainer picks for such a checkpoint, with short completions, and
float32 on a CPU, where bf16 autocast is several times slower), for `--rounds` micro-rounds, then writes one
checkpoint. The sides alternate which goes first.

Reported per side (median, min, max, spread over `--repeats`): peak memory (resident set on CPU; peak allocated
GPU memory with ``--device cuda``), GRPO step time without the first round, trainable parameters and the
checkpoint's size on disk (an adapter checkpoint holds the adapter alone). Random weights never answer in the
format, so the rewards carry no signal: this measures cost, not learning.

Run: ``python -m benchmarks.lora [--architecture qwen2.5-vl-3b] [--text-layers 2] [--rank 8] [--repeats 3]``.
The table goes to stderr; the last line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks._stats import print_table, spread

ROOT = Path(__file__).resolve().parents[1]
SIDES = ("full", "lora")
FIRST_INDEX = 40_000


@contextmanager
def model_folder(architecture: str, text_layers: int | None, vision_layers: int | None) -> Iterator[Path]:
    """The random-weight checkpoint every side starts from (built once per benchmark run, removed after it)."""
    from dpe.policy.architectures import build_published_policy

    with tempfile.TemporaryDirectory(prefix="bench-lora-") as scratch:
        folder = Path(scratch) / architecture
        build_published_policy(architecture, text_layers=text_layers, vision_layers=vision_layers, seed=0).save(folder)
        yield folder


def trainer_settings(args: argparse.Namespace, base_model: Path, side: str) -> Any:
    from trainer.settings import TrainerSettings

    return TrainerSettings(
        base_model=base_model, torch_threads=args.threads,
        grpo={"group_size": args.group_size, "prompts_per_step": args.prompts_per_step,
              "max_completion_length": args.max_completion_length, "bf16": args.device != "cpu"},
        deepspeed={"enabled": args.zero_stage >= 0, "zero_stage": max(args.zero_stage, 0)},
        lora={"rank": args.rank if side == "lora" else 0},
    )


def peak_memory_mb(device: str) -> float:
    """Peak resident memory of this process, or peak allocated GPU memory on a GPU."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One side: `--rounds` rounds of the engine, then one checkpoint (its scratch folder removed after)."""
    from trainer.engine import GRPOEngine

    settings = trainer_settings(args, Path(args.folder), args.worker)
    with tempfile.TemporaryDirectory(prefix="bench-lora-out-") as scratch:
        return train_and_save(GRPOEngine(Path(args.folder), settings, Path(scratch)), args, Path(scratch))


def train_and_save(engine: Any, args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    """`--rounds` rounds of `engine`, then one checkpoint written under `scratch`: the side's measurements."""
    from dpe.world import make_item
    from trainer.samples import TrainingSample

    trainable = sum(p.numel() for p in engine.policy.model.parameters() if p.requires_grad)
    items = [make_item("color", 1, FIRST_INDEX + index) for index in range(args.rounds * args.round_samples)]
    samples = [TrainingSample(sample_id=f"b{i}", capability=item.capability, image=item.image, question=item.question,
                              answer=item.answer, answer_type=item.answer_type, options=item.options,
                              tolerance=item.tolerance, policy_version=0) for i, item in enumerate(items)]
    steps = []
    for round_index in range(args.rounds):
        stats = engine.train_round(samples[round_index * args.round_samples:(round_index + 1) * args.round_samples])
        if round_index:
            steps += stats.steps
    checkpoint = scratch / "checkpoint"
    checkpoint.mkdir()
    started = time.perf_counter()
    engine.save(checkpoint)
    weights = sum(path.stat().st_size for path in checkpoint.glob("*.safetensors"))
    return {"peak_memory_mb": peak_memory_mb(args.device), "step_s": statistics.median(s.seconds for s in steps),
            "tokens_per_s": statistics.median(s.tokens / s.seconds for s in steps),
            "trainable_parameters": trainable, "checkpoint_weights_mb": weights / 2**20,
            "checkpoint_write_s": time.perf_counter() - started}


def run_worker(module: str, side: str, args: argparse.Namespace, folder: Path) -> dict[str, Any]:
    """`python -m <module> --worker side` on `folder` in a fresh process, with `args`' `SHARED` values; its last
    stdout line is its JSON result."""
    values = [f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SHARED if getattr(args, name) is not None]
    command = [sys.executable, "-m", module, "--worker", side, "--folder", str(folder), *values]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(f"the {module} {side} worker failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


SHARED = ("architecture", "text_layers", "vision_layers", "rank", "rounds", "round_samples", "prompts_per_step",
          "group_size", "max_completion_length", "threads", "zero_stage", "device")
METRICS = {"peak_memory_mb": ("peak memory", "MB"), "step_s": ("GRPO step", "s"),
           "trainable_parameters": ("trainable parameters", "M"), "checkpoint_weights_mb": ("checkpoint weights", "MB")}


def parser() -> argparse.ArgumentParser:
    parsed = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parsed.add_argument("--architecture", default="qwen2.5-vl-3b", help="A `dpe.policy.architectures.PUBLISHED` name.")
    parsed.add_argument("--text-layers", type=int, default=2)
    parsed.add_argument("--vision-layers", type=int, default=2)
    parsed.add_argument("--rank", type=int, default=8, help="LoRA rank of the lora side.")
    parsed.add_argument("--repeats", type=int, default=3)
    parsed.add_argument("--rounds", type=int, default=3, help="Rounds per run; the first is warm-up.")
    parsed.add_argument("--round-samples", type=int, default=4)
    parsed.add_argument("--prompts-per-step", type=int, default=4)
    parsed.add_argument("--group-size", type=int, default=4)
    parsed.add_argument("--max-completion-length", type=int, default=8)
    parsed.add_argument("--threads", type=int, default=2, help="torch threads in each process.")
    parsed.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed ZeRO stage; -1 turns DeepSpeed off.")
    parsed.add_argument("--device", default="cpu", help="cpu, or cuda on a GPU machine (peak allocated memory).")
    parsed.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parsed.add_argument("--folder", help=argparse.SUPPRESS)
    return parsed


def main() -> None:
    args = parser().parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    with model_folder(args.architecture, args.text_layers, args.vision_layers) as folder:
        rows = measure(args, folder)
    print_rows(args, rows)


def measure(args: argparse.Namespace, folder: Path) -> dict[str, list[float]]:
    """Every repeat of both sides on `folder`, as table rows."""
    rows: dict[str, list[float]] = {f"{label}, {side}": [] for label, _ in METRICS.values() for side in SIDES}
    rows |= {"peak memory ratio lora/full": [], "step time ratio lora/full": []}
    for repeat in range(args.repeats):
        order = SIDES if repeat % 2 == 0 else SIDES[::-1]
        results = {side: run_worker("benchmarks.lora", side, args, folder) for side in order}
        for metric, (label, _) in METRICS.items():
            for side in SIDES:
                scale = 1e-6 if metric == "trainable_parameters" else 1.0
                rows[f"{label}, {side}"].append(results[side][metric] * scale)
        lora, full = results["lora"], results["full"]
        rows["peak memory ratio lora/full"].append(lora["peak_memory_mb"] / full["peak_memory_mb"])
        rows["step time ratio lora/full"].append(lora["step_s"] / full["step_s"])
        print(f"repeat {repeat + 1}/{args.repeats}: peak {results['full']['peak_memory_mb']:.0f} MB full, "
              f"{results['lora']['peak_memory_mb']:.0f} MB lora", file=sys.stderr)
    return rows


def print_rows(args: argparse.Namespace, rows: dict[str, list[float]]) -> None:
    """The table (stderr) and the JSON line (stdout's last)."""
    units = {f"{label}, {side}": unit for label, unit in METRICS.values() for side in SIDES}
    units |= {"peak memory ratio lora/full": "x", "step time ratio lora/full": "x"}
    setup = (f"{args.architecture} at {args.text_layers}+{args.vision_layers} layers, rank {args.rank}, "
             f"G={args.group_size}, {args.prompts_per_step} prompts/step, completion <= {args.max_completion_length}, "
             f"ZeRO-{args.zero_stage}, {args.device}, {args.threads} thread(s)")
    print_table(f"Trainer with and without LoRA ({setup})", rows, units, {})
    print(json.dumps({name.replace(", ", "_").replace(" ", "_").replace("/", "_"): spread(values)["median"]
                      for name, values in rows.items()} | {"repeats": args.repeats, "setup": setup}))


if __name__ == "__main__":
    main()
