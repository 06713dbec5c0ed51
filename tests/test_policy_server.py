"""`dpe serve policy`: the policy server follows the checkpoints on the embedded broker and answers over real HTTP
(the OpenAI client), every answer naming the policy version that made it.

Each version is a tiny policy with its own weights, so which version answered is checked against that version's
own answers, generated locally with the same prompt and seed.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client import REGISTRY

from consumers.policy.service import serve_policy
from dpe.bus.aio import AsyncPublisher
from dpe.broker import free_port
from dpe.config import with_overrides, write_config
from dpe.endpoint.client import image_part
from dpe.events import Checkpoint
from dpe.policy.config import TinyVLMConfig
from dpe.policy.generation import SamplingParams, generate
from dpe.policy.model import Policy, build_tiny_policy
from dpe.policy.prompts import build_messages, format_question
from dpe.world import diagnostic_sample

ITEM = diagnostic_sample(0, 1)[0]


def tiny(seed: int, folder: Path) -> tuple[Policy, Path]:
    policy = build_tiny_policy(TinyVLMConfig(corpus_items=10, seed=seed))
    return policy, policy.save(folder)


def local_answers(policy: Policy, params: SamplingParams, seed: int | None = None, item=ITEM) -> list[str]:
    """What `policy` answers `item` in-process."""
    (answers,) = generate(policy, [item.image], [build_messages(item.question, item.answer_type, item.options)],
                          params, seed=seed)
    return answers


async def ask(client: openai.AsyncOpenAI, model: str, **options) -> tuple[str, list[str]]:
    """The answering model's name and the completions, for `ITEM`."""
    text = format_question(ITEM.question, ITEM.answer_type, ITEM.options)
    reply = await client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [image_part(ITEM.image), {"type": "text", "text": text}]}],
        **options)
    return reply.model, [choice.message.content for choice in reply.choices]


def metric(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def until_served(client: openai.AsyncOpenAI, model: str, timeout_s: float = 60.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while f"{model}" not in {entry.id for entry in (await client.models.list()).data}:
        assert asyncio.get_running_loop().time() < deadline, f"{model} never served"
        await asyncio.sleep(0.1)


@pytest.mark.timeout(300)
async def test_the_policy_server_moves_to_each_checkpoint_and_names_the_version_of_every_answer(settings, tmp_path):
    checkpoints = settings.home / "checkpoints"
    v0, base = tiny(0, tmp_path / "base")
    v1, v1_folder = tiny(1, checkpoints / "v00000001")
    _, v2_folder = tiny(2, checkpoints / "v00000002")
    _, outside = tiny(3, tmp_path / "elsewhere")
    port = free_port()
    configured = with_overrides(settings, {"policy": {"port": port, "base_policy": str(base), "keep_versions": 2}})
    refused_before = metric("dpe_policy_server_loads_total", outcome="refused")
    loaded_before = metric("dpe_policy_server_loads_total", outcome="loaded")
    stop, ready = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_policy(configured, stop, ready))
    await asyncio.wait_for(ready.wait(), 60)
    client = openai.AsyncOpenAI(base_url=configured.policy.url, api_key="unused", max_retries=0)
    greedy = SamplingParams(max_new_tokens=6)
    try:
        assert [entry.id for entry in (await client.models.list()).data] == ["dpe-policy", "dpe-policy@v0"]
        assert await ask(client, "dpe-policy", max_tokens=6, temperature=0) == (
            "dpe-policy@v0", local_answers(v0, greedy))
        model, sampled = await ask(client, "dpe-policy", n=3, temperature=1.0, seed=7, max_tokens=6)
        assert (model, sampled) == ("dpe-policy@v0", local_answers(
            v0, SamplingParams(max_new_tokens=6, temperature=1.0, num_samples=3), seed=7)), "n samples, seeded"

        async with AsyncPublisher(configured, producer_name="test") as publisher:
            await publisher.publish(Checkpoint(policy_version=1, parent_version=0, uri=str(v1_folder)))
            await publisher.flush()
        await until_served(client, "dpe-policy@v1")
        assert await ask(client, "dpe-policy", max_tokens=6, temperature=0) == (
            "dpe-policy@v1", local_answers(v1, greedy)), "the newest version answers"
        assert await ask(client, "dpe-policy@v0", max_tokens=6, temperature=0) == (
            "dpe-policy@v0", local_answers(v0, greedy)), "the version before it still answers when asked for"

        async with AsyncPublisher(configured, producer_name="test") as publisher:
            await publisher.publish(Checkpoint(policy_version=3, parent_version=2, uri=str(outside)))
            await publisher.publish(Checkpoint(policy_version=2, parent_version=1, uri=str(v2_folder)))
            await publisher.flush()
        await until_served(client, "dpe-policy@v2")
        with pytest.raises(openai.NotFoundError, match=r"policy version 0 is not loaded here \(loaded: 1, 2\)"):
            await ask(client, "dpe-policy@v0", max_tokens=6)
        with pytest.raises(openai.NotFoundError, match="model 'gpt-4o' is not served here"):
            await ask(client, "gpt-4o", max_tokens=6)
        assert (await ask(client, "dpe-policy", max_tokens=6, temperature=0))[0] == "dpe-policy@v2", \
            "a checkpoint outside the roots is refused, the newest loadable one is served"
        assert metric("dpe_policy_server_loads_total", outcome="refused") - refused_before == 1
        assert metric("dpe_policy_server_loads_total", outcome="loaded") - loaded_before == 3
        assert metric("dpe_policy_server_version") == 2
    finally:
        stop.set()
        await asyncio.wait_for(server, 30)
        await client.close()


def test_dpe_serve_policy_serves_its_base_until_sigterm(settings, tmp_path):
    """The command as a container runs it: a real process, its base policy served, SIGTERM ends it cleanly."""
    _, base = tiny(0, tmp_path / "base")
    port = free_port()
    config = tmp_path / "dpe.yaml"
    write_config(settings, config)
    env = {name: value for name, value in os.environ.items() if not name.startswith("DPE_")}
    server = subprocess.Popen([sys.executable, "-m", "dpe", "--config", str(config), "serve", "policy", "--port",
                               str(port), "--base-policy", str(base)], env=env | {"DPE_POLICY__METRICS_PORT": "0"},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                listed = httpx.get(f"http://127.0.0.1:{port}/v1/models", timeout=2).json()
                break
            except httpx.TransportError:
                assert server.poll() is None and time.monotonic() < deadline, server.stdout.read()
                time.sleep(0.2)
        assert [entry["id"] for entry in listed["data"]] == ["dpe-policy", "dpe-policy@v0"]
        server.send_signal(signal.SIGTERM)
        assert server.wait(30) == 0, server.stdout.read()
    finally:
        if server.poll() is None:
            server.kill()


@pytest.mark.timeout(300)
async def test_served_versions_answer_batches_like_local_copies_and_never_under_another_version(settings, tmp_path):
    """`ServedPolicy` (what the evaluator, the band and the auditor use under `inference.mode: server`): many prompts
    at once give each prompt its version's own greedy answer; a version not loaded yet is waited for, one the server
    has moved past fails at once, and a reply that names another model is refused."""
    from dpe.endpoint.server import LocalServer, LocalVLM, ServerConfig
    from dpe.endpoint.served import ServedPolicy, VersionNotServed, WrongVersion
    from dpe.inference import PolicyVersions
    from dpe.policy.checkpoints import CheckpointOutsideRoots

    checkpoints = settings.home / "checkpoints"
    clients = ThreadPoolExecutor(max_workers=16, thread_name_prefix="client")

    def client_side(call, *args, **options):
        """`call` on a thread of the clients' own: the server in this event loop generates in the default pool,
        which blocking clients there would fill (in production the server is its own process)."""
        return asyncio.get_running_loop().run_in_executor(clients, partial(call, *args, **options))

    v1, v1_folder = tiny(1, checkpoints / "v00000001")
    v2, v2_folder = tiny(2, checkpoints / "v00000002")
    _, outside = tiny(3, tmp_path / "elsewhere")
    port = free_port()
    configured = with_overrides(settings, {"policy": {"port": port, "keep_versions": 1},
                                           "inference": {"mode": "server", "url": f"http://127.0.0.1:{port}/v1",
                                                         "wait_s": 60}})
    stop, ready = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_policy(configured, stop, ready))
    await asyncio.wait_for(ready.wait(), 60)
    versions = PolicyVersions(configured.inference, configured.placement, role="test")
    items = diagnostic_sample(0, 12)
    images = [item.image for item in items]
    conversations = [build_messages(item.question, item.answer_type, item.options) for item in items]
    greedy = SamplingParams(max_new_tokens=6)
    try:
        opening = client_side(versions.open, str(v1_folder), 1, roots=[checkpoints])
        await asyncio.sleep(1.0)
        assert not opening.done(), "a version the server has not loaded is waited for"
        async with AsyncPublisher(configured, producer_name="test") as publisher:
            await publisher.publish(Checkpoint(policy_version=1, parent_version=0, uri=str(v1_folder)))
            await publisher.flush()
        served_v1 = await asyncio.wait_for(opening, 60)
        one_by_one = [client_side(served_v1.generate, [image], [conversation], greedy)
                      for image, conversation in zip(images, conversations)]
        answers, *singles = await asyncio.gather(
            client_side(served_v1.generate, images, conversations, greedy), *one_by_one)
        assert answers == [local_answers(v1, greedy, item=item) for item in items]
        assert [single for (single,) in singles] == answers, "the same answer alone or in a batch"
        sampler = served_v1.sampler(images, conversations)
        drawn = await client_side(sampler, SamplingParams(max_new_tokens=4, temperature=1.0, num_samples=3),
                                        [5, 2])
        assert [len(samples) for samples in drawn] == [3, 3]

        with pytest.raises(CheckpointOutsideRoots):
            versions.open(str(outside), 3, roots=[checkpoints])
        async with AsyncPublisher(configured, producer_name="test") as publisher:
            await publisher.publish(Checkpoint(policy_version=2, parent_version=1, uri=str(v2_folder)))
            await publisher.flush()
        served_v2 = await client_side(versions.open, str(v2_folder), 2, roots=[checkpoints])
        assert await client_side(served_v2.generate, images[:2], conversations[:2], greedy) == [
            local_answers(v2, greedy, item=item) for item in items[:2]]
        with pytest.raises(VersionNotServed, match=r"policy version 1 is no longer served .*loaded: 2"):
            await client_side(served_v1.generate, images[:1], conversations[:1], greedy)
        impatient = ServedPolicy(configured.inference.model_copy(update={"wait_s": 1.0}), role="test")
        with pytest.raises(VersionNotServed, match="policy version 7 was not served .* within 1s"):
            await client_side(impatient.wait_served, 7)
    finally:
        stop.set()
        await asyncio.wait_for(server, 30)
        versions.close()

    async with LocalServer(LocalVLM(v1, ServerConfig(model_name="another-model"))) as other:
        wrong = ServedPolicy(configured.inference.model_copy(update={"url": other.url}), role="test")
        with pytest.raises(WrongVersion, match="asked dpe-policy@v1, the reply names another-model"):
            await client_side(wrong.generate, 1, images[:1], conversations[:1], greedy)
    clients.shutdown()


class StandInVllm:
    """A stand-in for vLLM's OpenAI-compatible server with runtime LoRA updates (vLLM needs a GPU; this machine has
    none): the endpoints the vLLM engine drives, answering as vLLM documents them. It loads no weights."""

    def __init__(self, base: Path, served_as: str = "dpe-policy@v0"):
        self.base, self.served_as = base, served_as
        self.adapters: dict[str, str] = {}
        self.calls: list[tuple[str, str]] = []

    def app(self):
        from aiohttp import web

        async def models(request):
            listed = [{"id": self.served_as, "root": str(self.base), "parent": None}]
            listed += [{"id": name, "root": path, "parent": self.served_as} for name, path in self.adapters.items()]
            return web.json_response({"object": "list", "data": listed})

        async def load(request):
            body = await request.json()
            self.calls.append(("load", body["lora_name"]))
            if not (Path(body["lora_path"]) / "adapter_config.json").is_file():
                return web.Response(status=400, text=f"no adapter at {body['lora_path']}")
            self.adapters[body["lora_name"]] = body["lora_path"]
            return web.Response(text=f"Success: LoRA adapter '{body['lora_name']}' added successfully.")

        async def unload(request):
            body = await request.json()
            self.calls.append(("unload", body["lora_name"]))
            if self.adapters.pop(body["lora_name"], None) is None:
                return web.Response(status=404, text="not loaded")
            return web.Response(text="unloaded")

        async def chat(request):
            model = (await request.json())["model"]
            if model != self.served_as and model not in self.adapters:
                return web.json_response({"error": {"message": f"The model `{model}` does not exist."}}, status=404)
            return web.json_response({"id": "x", "object": "chat.completion", "created": 0, "model": model,
                                      "choices": [{"index": 0, "finish_reason": "stop",
                                                   "message": {"role": "assistant", "content": "\\boxed{A}"}}]})

        app = web.Application()
        app.router.add_get("/v1/models", models)
        app.router.add_post("/v1/load_lora_adapter", load)
        app.router.add_post("/v1/unload_lora_adapter", unload)
        app.router.add_post("/v1/chat/completions", chat)
        return app


def adapter_checkpoint(base: Path, folder: Path) -> Path:
    """A real peft LoRA adapter of the policy saved at `base`, saved in `folder` (naming `base`)."""
    from peft import LoraConfig, get_peft_model

    from dpe.policy.model import load_policy

    model = get_peft_model(load_policy(base).model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model.save_pretrained(folder)
    return folder


@pytest.mark.timeout(300)
async def test_the_vllm_engine_hot_loads_each_versions_adapter_under_its_name(settings, tmp_path, caplog):
    """`policy.engine: vllm`: version 0 is vLLM's base; each newer adapter checkpoint is loaded into vLLM as
    `dpe-policy@vN` and the versions beyond `keep_versions` unloaded; a full checkpoint past version 0, an adapter of
    another base and one outside the roots are refused; the callers' `ServedPolicy` gets each version by name."""
    from aiohttp import web

    from dpe.endpoint.served import ServedPolicy

    checkpoints = settings.home / "checkpoints"
    _, base = tiny(0, checkpoints / "base")
    _, other_base = tiny(5, checkpoints / "other-base")
    adapters = {version: adapter_checkpoint(base, checkpoints / f"v{version:08d}") for version in (1, 2, 3)}
    _, full = tiny(4, checkpoints / "v00000004")
    foreign = adapter_checkpoint(other_base, checkpoints / "v00000005")
    outside = adapter_checkpoint(base, tmp_path / "elsewhere")
    vllm = StandInVllm(base)
    runner = web.AppRunner(vllm.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    configured = with_overrides(settings, {
        "policy": {"engine": "vllm", "vllm_url": f"http://127.0.0.1:{port}", "keep_versions": 2},
        "inference": {"mode": "server", "url": f"http://127.0.0.1:{port}/v1", "wait_s": 30}})
    refused_before = metric("dpe_policy_server_loads_total", outcome="refused")
    stop, ready = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_policy(configured, stop, ready))
    served = ServedPolicy(configured.inference, role="test")
    try:
        await asyncio.wait_for(ready.wait(), 60)

        async def announce(version: int, folder: Path) -> None:
            async with AsyncPublisher(configured, producer_name="test") as publisher:
                await publisher.publish(Checkpoint(policy_version=version, parent_version=max(version - 1, 0),
                                                   uri=str(folder)))
                await publisher.flush()

        await announce(0, base)
        for version in (1, 2, 3):
            await announce(version, adapters[version])
            await asyncio.to_thread(served.wait_served, version)
        assert vllm.calls == [("load", "dpe-policy@v1"), ("load", "dpe-policy@v2"), ("load", "dpe-policy@v3"),
                              ("unload", "dpe-policy@v1")]
        assert vllm.adapters == {f"dpe-policy@v{v}": str(adapters[v]) for v in (2, 3)}
        assert await asyncio.to_thread(served.served_versions) == [0, 2, 3]
        greedy = SamplingParams(max_new_tokens=4)
        assert await asyncio.to_thread(served.generate, 3, [ITEM.image], [build_messages(
            ITEM.question, ITEM.answer_type, ITEM.options)], greedy) == [["\\boxed{A}"]]

        for version, folder in ((4, full), (5, foreign), (6, outside)):
            await announce(version, folder)
        deadline = time.monotonic() + 30
        while metric("dpe_policy_server_loads_total", outcome="refused") - refused_before < 3:
            assert time.monotonic() < deadline, "the three checkpoints vLLM cannot serve were not refused"
            await asyncio.sleep(0.2)
        assert await asyncio.to_thread(served.served_versions) == [0, 2, 3], "nothing loaded past the refusals"
        refusals = {record.getMessage().split(":", 1)[0]: record.getMessage() for record in caplog.records
                    if record.getMessage().startswith("refusing checkpoint")}
        assert "v4 is a full checkpoint: vLLM hot-loads LoRA adapters only" in refusals["refusing checkpoint v4"]
        assert f"adapter was trained on {other_base}; vLLM serves {base}" in refusals["refusing checkpoint v5"]
        assert "outside the checkpoint roots" in refusals["refusing checkpoint v6"]
    finally:
        stop.set()
        await asyncio.wait_for(server, 30)
        served.close()
        await runner.cleanup()


async def test_a_restarted_policy_server_serves_the_newest_versions_it_keeps(settings):
    """After a restart (a crash, a bus roll) the server reads every announced checkpoint at once: it serves the
    newest `keep_versions`, so a caller still grading the version before the newest finds it."""
    checkpoints = settings.home / "checkpoints"
    async with AsyncPublisher(settings, producer_name="test") as publisher:
        for version in (1, 2, 3):
            _, folder = tiny(version, checkpoints / f"v{version:08d}")
            await publisher.publish(Checkpoint(policy_version=version, parent_version=version - 1, uri=str(folder)))
        await publisher.flush()
    configured = with_overrides(settings, {"policy": {"port": free_port(), "keep_versions": 2}})
    stop, ready = asyncio.Event(), asyncio.Event()
    server = asyncio.create_task(serve_policy(configured, stop, ready))
    client = openai.AsyncOpenAI(base_url=configured.policy.url, api_key="unused", max_retries=0)
    try:
        await asyncio.wait_for(ready.wait(), 60)
        await until_served(client, "dpe-policy@v2")
        assert [entry.id for entry in (await client.models.list()).data] == [
            "dpe-policy", "dpe-policy@v2", "dpe-policy@v3"]
        assert metric("dpe_policy_server_version") == 3
    finally:
        stop.set()
        await asyncio.wait_for(server, 30)
        await client.close()
