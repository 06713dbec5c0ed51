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
        assert server.wait(30) == 0
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
