"""``dpe serve policy``: the policy server until SIGINT or SIGTERM.

Example:
    >>> policy.name
    'policy'
"""

from __future__ import annotations

import click

from consumers.policy.service import serve_policy
from consumers.policy.settings import PolicyServerConfig
from dpe.command import CliState, pass_state
from dpe.config import with_overrides
from dpe.lifecycle import run_until_stopped, start_service
from dpe.policy.threads import cap_torch_threads


@click.command("policy")
@click.option("--port", type=click.IntRange(0, 65535), default=None, help="HTTP port (default: policy.port, 8100).")
@click.option("--base-policy", type=click.Path(exists=True, file_okay=False), default=None,
              help="Version 0's folder, served until a checkpoint is announced (default: policy.base_policy).")
@click.option("--engine", type=click.Choice(["local", "vllm"]), default=None,
              help="local: load and answer here; vllm: hot-load each version's LoRA adapter into the vLLM server at "
              "--vllm-url, which answers (default: policy.engine).")
@click.option("--vllm-url", default=None, help="The vLLM server's root URL (default: policy.vllm_url).")
@pass_state
def policy(state: CliState, port: int | None, base_policy: str | None, engine: str | None,
           vllm_url: str | None) -> None:
    """Serve the newest policy versions over an OpenAI-compatible API, moving to each announced checkpoint."""
    settings = with_overrides(state.settings_as(PolicyServerConfig), {"policy": {
        "port": port, "base_policy": base_policy, "engine": engine, "vllm_url": vllm_url}})
    cap_torch_threads(settings.policy.torch_threads or 0)
    start_service(settings, settings.policy.metrics_port)
    served = settings.policy.vllm_url + "/v1" if settings.policy.engine == "vllm" else settings.policy.url
    click.echo(f"policy versions at {served} ({settings.policy.model_name}@vN, {settings.policy.engine} engine); "
               "SIGTERM or Ctrl-C stops", err=True)
    run_until_stopped(lambda stop: serve_policy(settings, stop))
