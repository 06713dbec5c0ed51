"""`dpe serve agents`: run one agent worker (start several for more throughput; they share the plan).

Stops cleanly on SIGTERM or Ctrl-C: the batch in hand is finished, flushed and committed.
"""

from __future__ import annotations

import asyncio

import click
from rich.console import Console

from consumers.agents.service import AgentWorker
from consumers.agents.settings import AgentsConfig
from dpe.command import CliState, pass_state
from dpe.config import with_overrides
from dpe.lifecycle import run_until_stopped, start_service
from dpe.policy.threads import cap_torch_threads

console = Console(stderr=True)


async def run_agents(settings: AgentsConfig, stop: asyncio.Event) -> None:
    """Run one worker until `stop` is set."""
    ready = asyncio.Event()
    worker = asyncio.create_task(AgentWorker(settings).run(stop, ready))
    announce = asyncio.create_task(ready.wait())
    await asyncio.wait({worker, announce}, return_when=asyncio.FIRST_COMPLETED)
    if ready.is_set():
        console.print(f"[green]agents ready[/] (group {settings.agents.group_id}); SIGTERM or Ctrl-C stops")
    announce.cancel()
    await worker


@click.command()
@click.option("--group", default=None, help="Consumer group shared by the workers (default agents.group_id).")
@click.option("--backend", type=click.Choice(["pixels", "llm", "programmatic"]), default=None,
              help="Play planner, writer, validator and answerer with this backend.")
@click.option("--llm-url", default=None, help="OpenAI-compatible base URL, e.g. http://127.0.0.1:8000/v1.")
@click.option("--llm-model", default=None, help="Model name at that endpoint.")
@click.option("--llm-concurrency", type=click.IntRange(min=1), default=None, help="LLM requests in flight at most.")
@click.option("--checker-url", default=None, help="Base URL of the model that checks (agents.checker_llm).")
@click.option("--checker-model", default=None, help="That model's name: another model than --llm-model.")
@click.option("--concurrency", type=click.IntRange(min=1), default=None, help="Items in flight at most.")
@click.option("--difficulty/--no-difficulty", default=None, help="Check the policy's pass rate band.")
@click.option("--base-policy", default=None, help="Policy folder for the difficulty check before any checkpoint.")
@click.option("--metrics-port", type=click.IntRange(0, 65535), default=None, help="Prometheus port (0: off).")
@pass_state
def agents(state: CliState, group: str | None, backend: str | None, llm_url: str | None, llm_model: str | None,
           llm_concurrency: int | None, checker_url: str | None, checker_model: str | None, concurrency: int | None,
           difficulty: bool | None, base_policy: str | None, metrics_port: int | None) -> None:
    """Turn unlabeled items into QC-passed samples that fill the latest quota plan exactly."""
    backends = dict.fromkeys(("planner", "writer", "validator", "answerer"), backend) if backend else None
    checker = {"base_url": checker_url, "model": checker_model} if checker_url or checker_model else None
    settings = with_overrides(state.settings_as(AgentsConfig), {"agents": {
        "group_id": group, "concurrency": concurrency, "metrics_port": metrics_port, "backends": backends,
        "llm": {"base_url": llm_url, "model": llm_model, "concurrency": llm_concurrency}, "checker_llm": checker,
        "qc": {"difficulty": {"enabled": difficulty, "base_policy": base_policy}},
    }})
    if settings.agents.qc.difficulty.enabled:
        cap_torch_threads(settings.agents.qc.difficulty.torch_threads)
    start_service(settings, settings.agents.metrics_port)
    run_until_stopped(lambda stop: run_agents(settings, stop))
