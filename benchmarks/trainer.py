"""The GRPO trainer against TRL's GRPOTrainer used directly, on the same tiny model and batch.

Both sides train the warmed tiny VLM with the same GRPO settings (group size, prompts per step,
completion length, learning rate, KL, clipping, rewards, DeepSpeed ZeRO stage), each in a fresh
process per repetition, alternating which goes first:

- ours: accepted samples published on the embedded broker, then `trainer.service.run_trainer`
  for `--rounds` micro-rounds (consume, GRPO steps, checkpoint, announce);
- TRL: `GRPOTrainer.train()` on a dataset of the same samples for as many steps.

Reported, without the first round (and as many of TRL's first steps), which carry one-off warm-up:
- GRPO step time, median per repetition (rollouts, scoring, backward, optimiser step), and the
  ratio ours / TRL (target <= 1.0); the tokens a step processed (prompt + completion: rollouts
  differ from run to run) and the ratio of time per token;
- round overhead share: (consume + checkpoint + announce) / round time (target <= 0.10);
- peak RSS of each process.

Run: `python -m benchmarks.trainer [--repeats 3] [--rounds 4]`. The table goes to stderr; the last
line of stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from benchmarks._stats import print_table, spread
from dpe.broker import EmbeddedBroker, free_port
from dpe.policy.config import WarmupConfig

ROOT = Path(__file__).resolve().parents[1]
RECIPE = WarmupConfig(mix={"color": 1.0}, levels=(1,), steps=40, batch_size=16)
"""The base model: the tiny VLM warmed up on colour questions (the same recipe the trainer tests use)."""
FIRST_INDEX = 30_000


def trainer_section(args: argparse.Namespace, base_model: Path) -> dict[str, Any]:
    """The trainer settings both sides share."""
    return {
        "base_model": str(base_model),
        "torch_threads": args.threads,
        "grpo": {"preset": "tiny", "group_size": args.group_size, "prompts_per_step": args.prompts_per_step,
                 "max_completion_length": args.max_completion_length},
        "rounds": {"max_samples": args.round_samples, "max_seconds": 60.0},
        "deepspeed": {"enabled": args.zero_stage >= 0, "zero_stage": max(args.zero_stage, 0)},
        "staleness": {"max_versions": None},
    }


def bench_items(count: int) -> list:
    from dpe.world import make_item

    return [make_item("color", 1, FIRST_INDEX + index) for index in range(count)]


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def ours(args: argparse.Namespace, base_model: Path) -> dict[str, Any]:
    """Publish the samples, then run the trainer service for `args.rounds` rounds (its folders removed after)."""
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as scratch:
        return await run_ours(args, base_model, Path(scratch))


async def run_ours(args: argparse.Namespace, base_model: Path, home: Path) -> dict[str, Any]:
    """`ours` with the trainer's home (checkpoints, blobs) in `home`."""
    from dpe.blobstore import BlobStore
    from dpe.bus.admin import ensure_topics
    from dpe.bus.aio import AsyncPublisher
    from dpe.events import AcceptedSample
    from dpe.settings import Settings
    from trainer.service import run_trainer

    settings = Settings.load(overrides={
        "home": str(home),
        "kafka": {"bootstrap_servers": args.bootstrap, "topic_prefix": f"bench{uuid.uuid4().hex[:8]}."},
        "blob": {"url": str(home / "blobs")},
        "metrics": {"port": free_port(), "addr": "127.0.0.1"},
        "trainer": trainer_section(args, base_model),
    })
    ensure_topics(settings, args.bootstrap)
    blobs = BlobStore(settings.blob.url, settings.blob.limits)
    async with AsyncPublisher(settings, producer_name="bench") as publisher:
        for index, item in enumerate(bench_items(args.rounds * args.round_samples)):
            buffer = io.BytesIO()
            item.image.save(buffer, format="PNG")
            body = item.to_sample_body(blobs.put_image(buffer.getvalue()))
            await publisher.publish(AcceptedSample(sample_id=f"bench-{index}", capability=item.capability, body=body,
                                                   source_item_id=item.item_id, plan_id="bench", agents=[], qc=[],
                                                   policy_version=0))
        await publisher.flush()
    reports = (await run_trainer(settings, max_rounds=args.rounds))[1:]
    return {
        "step_seconds": [seconds for report in reports for seconds in report.step_seconds],
        "step_tokens": [tokens for report in reports for tokens in report.step_tokens],
        "overhead_share": sum(r.consume_s + r.checkpoint_s + r.announce_s for r in reports)
        / sum(r.consume_s + r.train_s + r.checkpoint_s + r.announce_s for r in reports),
        "consume_s": statistics.median(r.consume_s for r in reports),
        "checkpoint_s": statistics.median(r.checkpoint_s for r in reports),
        "announce_s": statistics.median(r.announce_s for r in reports),
        "round_s": statistics.median(r.consume_s + r.train_s + r.checkpoint_s + r.announce_s for r in reports),
        "peak_rss_mb": peak_rss_mb(),
    }


def train_with_trl(settings: Any, base_model: Path, rows: list[dict[str, Any]], max_steps: int) -> dict[str, Any]:
    """TRL's GRPOTrainer.train() for `max_steps` steps on `rows` (`TrainingSample.row`s) from `base_model`, with the
    trainer's GRPO configuration and rewards and its float32 master weights: each step's wall time and the tokens
    TRL counted during it, and the peak RSS."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOTrainer

    from dpe.policy.model import load_policy, suppressed_token_ids
    from trainer.distributed import prepare_process
    from trainer.engine import MASTER_WEIGHTS, grpo_config
    from trainer.rewards import policy_rewards

    class StepTimer(TrainerCallback):
        """Each optimiser step's wall time, and the tokens TRL counted during it."""

        def __init__(self) -> None:
            self.seconds: list[float] = []
            self.tokens: list[int] = []
            self.started = 0.0
            self.tokens_before = 0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.started = time.perf_counter()
            self.tokens_before = state.num_input_tokens_seen

        def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self.seconds.append(time.perf_counter() - self.started)
            self.tokens.append(int(state.num_input_tokens_seen - self.tokens_before))

    prepare_process(settings)
    policy = load_policy(base_model, MASTER_WEIGHTS)
    timer = StepTimer()
    with tempfile.TemporaryDirectory(prefix="bench-trl-") as scratch:
        rewards = policy_rewards(settings.grpo.accuracy_weight, settings.grpo.format_weight)
        config = grpo_config(settings, Path(scratch), suppressed_token_ids(policy.tokenizer), world_size=1,
                             reward_weights=list(rewards.values()))
        config.max_steps = max_steps
        trainer = GRPOTrainer(model=policy.model, reward_funcs=list(rewards), args=config,
                              train_dataset=Dataset.from_list(rows), processing_class=policy.processor,
                              callbacks=[timer])
        trainer.train()
    return {"step_seconds": timer.seconds, "step_tokens": timer.tokens, "peak_rss_mb": peak_rss_mb()}


def trl(args: argparse.Namespace, base_model: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer.train() on the same samples, model, rewards and GRPO configuration."""
    from trainer.samples import TrainingSample
    from trainer.settings import TrainerSettings

    steps_per_round = -(-args.round_samples // args.prompts_per_step)
    rows = [
        TrainingSample(sample_id=f"bench-{index}", capability=item.capability, image=item.image, question=item.question,
                       answer=item.answer, answer_type=item.answer_type, options=item.options, tolerance=item.tolerance,
                       policy_version=0).row()
        for index, item in enumerate(bench_items(args.rounds * args.round_samples))
    ]
    timed = train_with_trl(TrainerSettings(**trainer_section(args, base_model)), base_model, rows,
                           args.rounds * steps_per_round)
    return {name: values[steps_per_round:] for name, values in timed.items() if name != "peak_rss_mb"} | {
        "peak_rss_mb": timed["peak_rss_mb"]}


def seconds_per_token(result: dict[str, Any]) -> float:
    """Median over steps of a step's time divided by the tokens it processed."""
    return statistics.median(s / t for s, t in zip(result["step_seconds"], result["step_tokens"], strict=True))


def run_worker(kind: str, args: argparse.Namespace) -> dict[str, Any]:
    """One side in a fresh process; its last stdout line is its JSON result."""
    command = [sys.executable, "-m", "benchmarks.trainer", "--worker", kind, "--bootstrap", args.bootstrap,
               *(f"--{name.replace('_', '-')}={getattr(args, name)}" for name in SHARED)]
    done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode != 0:
        sys.stderr.write(done.stderr[-5000:])
        raise SystemExit(f"the {kind} worker failed ({done.returncode})")
    return json.loads(done.stdout.strip().splitlines()[-1])


SHARED = ("rounds", "round_samples", "prompts_per_step", "group_size", "max_completion_length", "threads", "zero_stage")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="Rounds per run; the first is warm-up.")
    parser.add_argument("--round-samples", type=int, default=32)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--max-completion-length", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each process.")
    parser.add_argument("--zero-stage", type=int, default=2, help="DeepSpeed ZeRO stage; -1 turns DeepSpeed off.")
    parser.add_argument("--worker", choices=("ours", "trl"), help=argparse.SUPPRESS)
    parser.add_argument("--bootstrap", help=argparse.SUPPRESS)
    args = parser.parse_args()

    from dpe.policy.warmup import cached_folder, warm_up

    if args.worker:
        base_model = cached_folder(RECIPE)
        result = asyncio.run(ours(args, base_model)) if args.worker == "ours" else trl(args, base_model)
        print(json.dumps(result))
        return

    warm_up(RECIPE, show_progress=True)
    rows: dict[str, list[float]] = {name: [] for name in (
        "GRPO step, ours", "GRPO step, TRL", "step time ratio ours/TRL", "tokens per step, ours",
        "tokens per step, TRL", "time per token ratio ours/TRL", "round overhead share", "round time", "consume",
        "checkpoint write", "announce", "peak RSS, ours", "peak RSS, TRL")}
    with EmbeddedBroker() as broker:
        args.bootstrap = broker.bootstrap_servers
        for repeat in range(args.repeats):
            order = ("ours", "trl") if repeat % 2 == 0 else ("trl", "ours")
            results = {kind: run_worker(kind, args) for kind in order}
            mine, theirs = results["ours"], results["trl"]
            step_ours, step_trl = statistics.median(mine["step_seconds"]), statistics.median(theirs["step_seconds"])
            tokens_ours, tokens_trl = statistics.median(mine["step_tokens"]), statistics.median(theirs["step_tokens"])
            per_token = seconds_per_token(mine) / seconds_per_token(theirs)
            for name, value in (("GRPO step, ours", step_ours), ("GRPO step, TRL", step_trl),
                                ("step time ratio ours/TRL", step_ours / step_trl),
                                ("tokens per step, ours", tokens_ours), ("tokens per step, TRL", tokens_trl),
                                ("time per token ratio ours/TRL", per_token),
                                ("round overhead share", mine["overhead_share"]), ("round time", mine["round_s"]),
                                ("consume", mine["consume_s"]), ("checkpoint write", mine["checkpoint_s"]),
                                ("announce", mine["announce_s"]), ("peak RSS, ours", mine["peak_rss_mb"]),
                                ("peak RSS, TRL", theirs["peak_rss_mb"])):
                rows[name].append(value)
            print(f"repeat {repeat + 1}/{args.repeats}: step ours {step_ours:.3f}s, TRL {step_trl:.3f}s, "
                  f"overhead {mine['overhead_share']:.3f}", file=sys.stderr)
    units = {name: "s" for name in rows} | {
        "step time ratio ours/TRL": "x", "time per token ratio ours/TRL": "x", "tokens per step, ours": "tokens",
        "tokens per step, TRL": "tokens", "round overhead share": "share", "peak RSS, ours": "MB",
        "peak RSS, TRL": "MB"}
    targets = {"step time ratio ours/TRL": "<= 1.0", "round overhead share": "<= 0.10"}
    setup = (f"G={args.group_size}, {args.prompts_per_step} prompts/step, {args.round_samples} samples/round, "
             f"completion <= {args.max_completion_length} tokens, ZeRO-{args.zero_stage}, {args.threads} thread(s)")
    print_table(f"GRPO trainer vs TRL GRPOTrainer ({setup})", rows, units, targets)
    print(json.dumps({
        "step_time_ratio_vs_trl": spread(rows["step time ratio ours/TRL"])["median"],
        "time_per_token_ratio_vs_trl": spread(rows["time per token ratio ours/TRL"])["median"],
        "round_overhead_share": spread(rows["round overhead share"])["median"],
        "peak_rss_mb": max(rows["peak RSS, ours"]),
        "peak_rss_trl_mb": max(rows["peak RSS, TRL"]),
        "step_time_s": spread(rows["GRPO step, ours"])["median"],
        "step_time_trl_s": spread(rows["GRPO step, TRL"])["median"],
        "repeats": args.repeats,
        "setup": setup,
    }))


if __name__ == "__main__":
    main()
