"""Devices and precision as settings: where each service loads a policy, and the errors for what a machine lacks.

The GPU cases are resolved with a GPU count handed in (`cuda_devices`): resolving touches no GPU, so the rules are
checked here; loading onto a real GPU is for a GPU machine (`benchmarks.gpu`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from consumers.qc.difficulty import PolicyHolder
from dpe.config import CoreSettings, PlacementSettings
from dpe.policy.config import TinyVLMConfig
from dpe.policy.generation import SamplingParams, generate
from dpe.inference import PolicyVersions
from dpe.policy.model import build_tiny_policy, load_policy
from dpe.policy.placement import PlacementUnavailable, resolve_placement
from dpe.policy.weights import checkpoint_parameters
from dpe.policy.prompts import build_messages
from dpe.world import diagnostic_sample
from producers.evaluator.service import Evaluator
from producers.evaluator.settings import EvaluatorSettings

NO_GPU = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the errors of a machine without a GPU")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    return build_tiny_policy(TinyVLMConfig(corpus_items=10)).save(tmp_path_factory.mktemp("placement") / "v0")


def declaring(folder: Path, dtype: str) -> Path:
    """`folder` with its config.json declaring `dtype` (as a real checkpoint's does)."""
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "dtype": dtype}))
    return folder


def test_a_tiny_checkpoint_runs_in_float32_on_the_cpu_of_a_machine_without_a_gpu(tiny_folder):
    placement = resolve_placement(PlacementSettings(), tiny_folder, cuda_devices=0)
    assert (placement.device, placement.dtype, placement.attention) == ("cpu", torch.float32, "sdpa")


def test_a_checkpoint_above_the_float32_limit_never_loads_in_float32_by_default(tiny_folder, tmp_path):
    parameters = checkpoint_parameters(tiny_folder)
    assert parameters == build_tiny_policy(TinyVLMConfig(corpus_items=10)).num_parameters()
    large = PlacementSettings(float32_max_parameters=parameters - 1)
    assert resolve_placement(large, tiny_folder, cuda_devices=0).dtype == torch.bfloat16
    half = declaring(Path(load_policy(tiny_folder).save(tmp_path / "half")), "float16")
    assert resolve_placement(large, half, cuda_devices=0).dtype == torch.bfloat16, "float16 is slow and lossy on CPU"
    on_gpu = resolve_placement(large, half, cuda_devices=1)
    assert (on_gpu.device, on_gpu.dtype) == ("cuda", torch.float16), "on a GPU the checkpoint's own half precision"
    assert resolve_placement(large.model_copy(update={"dtype": "float32"}), half, cuda_devices=0).dtype == torch.float32


@pytest.mark.parametrize(("device", "gpus", "message"), [
    ("cuda", 0, "placement.device is 'cuda' but this machine has no CUDA GPU"),
    ("cuda:2", 2, "placement.device is 'cuda:2' but torch sees 2 GPU(s) (cuda:0 to cuda:1)"),
])
def test_a_gpu_the_machine_lacks_is_a_clear_error(tiny_folder, device, gpus, message):
    with pytest.raises(PlacementUnavailable, match=message.replace("(", r"\(").replace(")", r"\)")):
        resolve_placement(PlacementSettings(device=device), tiny_folder, cuda_devices=gpus)


def test_flash_attention_is_chosen_only_where_it_can_run_and_asking_for_it_elsewhere_is_an_error(tiny_folder):
    half_on_gpu = resolve_placement(PlacementSettings(dtype="bfloat16"), tiny_folder, cuda_devices=1)
    import importlib.util

    expected = "flash_attention_2" if importlib.util.find_spec("flash_attn") else "sdpa"
    assert half_on_gpu.attention == expected
    assert resolve_placement(PlacementSettings(), tiny_folder, cuda_devices=1).attention == "sdpa", "float32"
    with pytest.raises(PlacementUnavailable, match="placement.attention is flash_attention_2"):
        resolve_placement(PlacementSettings(attention="flash_attention_2"), tiny_folder, cuda_devices=0)


def test_placement_is_read_from_the_environment_and_refuses_an_unknown_device(monkeypatch):
    monkeypatch.setenv("DPE_PLACEMENT__DEVICE", "cuda:1")
    monkeypatch.setenv("DPE_PLACEMENT__DTYPE", "bfloat16")
    settings = CoreSettings.load()
    assert (settings.placement.device, settings.placement.dtype) == ("cuda:1", "bfloat16")
    with pytest.raises(ValueError, match="device"):
        PlacementSettings(device="gpu0")


def test_a_policy_loaded_in_bfloat16_answers_on_the_cpu(tiny_folder):
    policy = load_policy(tiny_folder, PlacementSettings(dtype="bfloat16", attention="eager"))
    assert {parameter.dtype for parameter in policy.model.parameters()} == {torch.bfloat16}
    assert policy.model.config._attn_implementation == "eager"
    item = diagnostic_sample(0, 1)[0]
    (answer,) = generate(policy, [item.image], [build_messages(item.question, item.answer_type, item.options)],
                         SamplingParams(max_new_tokens=4))
    assert len(answer) == 1 and isinstance(answer[0], str)


async def test_the_difficulty_band_loads_where_the_settings_say(tiny_folder):
    holder = PolicyHolder(str(tiny_folder), [tiny_folder.parent],
                          PolicyVersions(placement=PlacementSettings(dtype="bfloat16")))
    await holder.start()
    assert holder.get().policy.model.dtype == torch.bfloat16


@NO_GPU
async def test_services_asked_for_a_missing_gpu_stop_at_start_not_at_their_first_checkpoint(tiny_folder):
    on_gpu = PolicyVersions(placement=PlacementSettings(device="cuda"))
    with pytest.raises(PlacementUnavailable):
        await PolicyHolder(str(tiny_folder), [tiny_folder.parent], on_gpu).start()
    with pytest.raises(PlacementUnavailable):
        Evaluator(EvaluatorSettings(synthetic=None), CoreSettings().blob.limits, versions=on_gpu)
