"""The GPU check: a Qwen2.5-VL-3B-shaped model (random weights) trained, rolled out and reloaded on one CUDA GPU.

Each measurement runs in its own process on the same random-weight checkpoint of the published shape
(`dpe.policy.architectures`), the same samples and the same GRPO settings (the ``paper`` preset the trainer picks for
such a checkpoint, G=8, 8 prompts a step, completions of at most `--completion` tokens):

- trainer: the project's `GRPOEngine` (TRL's machinery on DeepSpeed ZeRO-2), GRPO step time and tokens per second
  per GPU, without its first round; peak GPU memory, full fine-tuning and with a rank-8 LoRA adapter
  (`benchmarks.lora`'s worker);
- TRL: `GRPOTrainer.train()` used directly on the same batch, for the step-time ratio;
- vLLM: rollout throughput (generated tokens per second, G samples per prompt) of the same checkpoint, when vLLM
  is installed;
- reload: seconds the policy server (`dpe serve policy`, local engine) takes to move to a newly announced
  checkpoint: its load onto the placement (``cuda``, bf16) and the swap.

Anchor: EasyR1 reports about 1,200 tokens/s per H100 for Qwen2.5-VL-3B GRPO.

``--dry-run`` runs the same wiring on the CPU at one text and one vision layer with a tiny batch, in about a
minute; vLLM is reported as skipped there. The table goes to stderr; the last line of stdout is one JSON object.

Run: ``python -m benchmarks.gpu`` on a GPU machine (about 8 minutes), ``python -m benchmarks.gpu --dry-run`` here.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import time
from pathlib import Path
from typing import Any

from benchmarks._stats import print_table
from benchmarks.lora import SHARED, model_folder, peak_memory_mb, run_worker, trainer_settings
from benchmarks.trainer import train_with_trl

EASYR1_TOKENS_PER_S = 1200.0
"""EasyR1's reported GRPO throughput for Qwen2.5-VL-3B, tokens per second per H100."""
FIRST_INDEX = 50_000


def shape(args: argparse.Namespace) -> argparse.Namespace:
    """The run's settings: the published depth and the full batch on a GPU, a tiny one for ``--dry-run``."""
    full = {"text_layers": None, "vision_layers": None, "group_size": 8, "prompts_per_step": 8,
            "round_samples": 8, "rounds": 3, "max_completion_length": args.completion, "device": "cuda"}
    dry = {"text_layers": 1, "vision_layers": 1, "group_size": 2, "prompts_per_step": 2, "round_samples": 2,
           "rounds": 2, "max_completion_length": 4, "device": "cpu"}
    return argparse.Namespace(**vars(args) | (dry if args.dry_run else full) | {
        "rank": 8, "zero_stage": 2, "threads": 2 if args.dry_run else 8})


def trl_worker(args: argparse.Namespace) -> dict[str, Any]:
    """TRL's GRPOTrainer.train() on the same checkpoint, samples and GRPO settings (`benchmarks.trainer`'s run)."""
    folder = Path(args.folder)
    settings = trainer_settings(args, folder, "full")
    settings = settings.model_copy(update={"grpo": settings.grpo.resolved(folder)})
    steps_per_round = -(-args.round_samples // args.prompts_per_step)
    timed = train_with_trl(settings, folder, [sample.row() for sample in samples(args)], args.rounds * steps_per_round)
    measured = list(zip(timed["step_seconds"], timed["step_tokens"]))[steps_per_round:]
    return {"step_s": statistics.median(seconds for seconds, _ in measured),
            "tokens_per_s": statistics.median(tokens / seconds for seconds, tokens in measured),
            "peak_memory_mb": peak_memory_mb(args.device)}


def vllm_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Rollouts of the checkpoint with vLLM: G samples for each of the prompts, generated tokens per second."""
    from vllm import LLM, SamplingParams

    from dpe.policy.processor import load_processor
    from dpe.policy.prompts import build_messages

    processor = load_processor(args.folder)
    engine = LLM(model=args.folder, dtype="bfloat16", gpu_memory_utilization=0.5, limit_mm_per_prompt={"image": 1},
                 max_model_len=4096, seed=0)
    prompts = [{"prompt": processor.apply_chat_template(build_messages(item.question, item.answer_type, item.options),
                                                        add_generation_prompt=True),
                "multi_modal_data": {"image": item.image}} for item in samples(args)]
    params = SamplingParams(n=args.group_size, temperature=1.0, max_tokens=args.max_completion_length, seed=0)
    engine.generate(prompts[:1], params)
    started = time.perf_counter()
    outputs = engine.generate(prompts, params)
    seconds = time.perf_counter() - started
    tokens = sum(len(sample.token_ids) for output in outputs for sample in output.outputs)
    return {"rollout_tokens_per_s": tokens / seconds, "rollout_s": seconds,
            "completions": args.group_size * len(prompts)}


def reload_worker(args: argparse.Namespace) -> dict[str, Any]:
    """Seconds the policy server takes to move to a newly announced checkpoint (`CheckpointLoader.load`: load onto
    the placement and serve), median of three after a first load."""
    import asyncio

    import torch

    from consumers.policy.service import CheckpointLoader, LocalEngine, VersionedModels
    from consumers.policy.settings import PolicyServerConfig
    from dpe.config import PlacementSettings

    settings = PolicyServerConfig(placement=PlacementSettings(device=args.device, dtype="bfloat16"))

    async def reloads() -> list[float]:
        models = VersionedModels(settings.policy)
        loader = CheckpointLoader(settings, LocalEngine(models, settings.placement))
        seconds = []
        try:
            for version in range(4):
                started = time.perf_counter()
                await loader.load(version, str(args.folder), roots=None)
                if args.device.startswith("cuda"):
                    torch.cuda.synchronize()
                seconds.append(time.perf_counter() - started)
        finally:
            await models.close()
        return seconds[1:]

    return {"reload_s": statistics.median(asyncio.run(reloads()))}


def samples(args: argparse.Namespace) -> list:
    """The benchmark's training samples (colour questions of the synthetic world, as the trainer receives them)."""
    from dpe.world import make_item
    from trainer.samples import TrainingSample

    items = [make_item("color", 1, FIRST_INDEX + index) for index in range(args.rounds * args.round_samples)]
    return [TrainingSample(sample_id=f"g{i}", capability=item.capability, image=item.image, question=item.question,
                           answer=item.answer, answer_type=item.answer_type, options=item.options,
                           tolerance=item.tolerance, policy_version=0) for i, item in enumerate(items)]


WORKERS = {"trl": trl_worker, "vllm": vllm_worker, "reload": reload_worker}


def vllm_unavailable(args: argparse.Namespace) -> str | None:
    """Why vLLM cannot be measured here (None: it can)."""
    if args.dry_run:
        return "dry run (CPU)"
    if importlib.util.find_spec("vllm") is None:
        return "vllm is not installed (pip install -e '.[gpu]')"
    return None


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every measurement, each in its own process."""
    if not args.dry_run:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("no CUDA GPU here: run with --dry-run to check the wiring on the CPU")
    started = time.perf_counter()
    skipped = vllm_unavailable(args)
    with model_folder(args.architecture, args.text_layers, args.vision_layers) as folder:
        ours = {side: run_worker("benchmarks.lora", side, args, folder) for side in ("full", "lora")}
        theirs = run_worker("benchmarks.gpu", "trl", args, folder)
        reload = run_worker("benchmarks.gpu", "reload", args, folder)
        rollouts = run_worker("benchmarks.gpu", "vllm", args, folder) if skipped is None else {}
    return {
        "device": args.device, "dry_run": args.dry_run, "architecture": args.architecture,
        "trainer_step_s": ours["full"]["step_s"], "trainer_tokens_per_s_per_gpu": ours["full"]["tokens_per_s"],
        "trl_step_s": theirs["step_s"], "trl_tokens_per_s_per_gpu": theirs["tokens_per_s"],
        "step_time_ratio_vs_trl": ours["full"]["step_s"] / theirs["step_s"],
        "vllm_rollout_tokens_per_s": rollouts.get("rollout_tokens_per_s"), "vllm_skipped": skipped,
        "reload_s": reload["reload_s"],
        "peak_memory_mb_full": ours["full"]["peak_memory_mb"], "peak_memory_mb_lora": ours["lora"]["peak_memory_mb"],
        "peak_memory_mb_trl": theirs["peak_memory_mb"],
        "easyr1_tokens_per_s_per_h100": EASYR1_TOKENS_PER_S, "seconds": time.perf_counter() - started,
        "setup": f"G={args.group_size}, {args.prompts_per_step} prompts/step, completion <= "
                 f"{args.max_completion_length}, ZeRO-{args.zero_stage}, LoRA rank {args.rank}",
    }


def parser() -> argparse.ArgumentParser:
    parsed = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parsed.add_argument("--dry-run", action="store_true", help="The same wiring on the CPU, tiny (about a minute).")
    parsed.add_argument("--architecture", default="qwen2.5-vl-3b", help="A `dpe.policy.architectures.PUBLISHED` name.")
    parsed.add_argument("--completion", type=int, default=256, help="Most completion tokens on a GPU.")
    parsed.add_argument("--worker", choices=sorted(WORKERS), help=argparse.SUPPRESS)
    parsed.add_argument("--folder", help=argparse.SUPPRESS)
    for name in (name for name in SHARED if name != "architecture"):
        parsed.add_argument(f"--{name.replace('_', '-')}", type=str if name == "device" else int,
                            help=argparse.SUPPRESS)
    return parsed


def main() -> None:
    args = parser().parse_args()
    if args.worker:
        print(json.dumps(WORKERS[args.worker](args)))
        return
    result = measure(shape(args))
    rows = {name: [value] for name, value in result.items()
            if isinstance(value, float) and name not in ("seconds", "easyr1_tokens_per_s_per_h100")}
    units = {name: "MB" if "memory" in name else "tokens/s" if "tokens" in name else "s" if name.endswith("_s")
             else "x" for name in rows}
    print_table(f"GPU check ({result['architecture']}, {result['device']}, {result['setup']})", rows, units,
                {"trainer_tokens_per_s_per_gpu": f">= {EASYR1_TOKENS_PER_S:,.0f} (EasyR1, H100)"})
    print(json.dumps(result))


if __name__ == "__main__":
    main()
