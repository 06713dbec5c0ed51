"""Settings of the policy server (`dpe serve policy`): the ``policy`` section.

`PolicyServerConfig` is what the server reads: the core settings (the checkpoint roots and the ``placement`` its
models load with) plus this section. In the YAML file::

    policy:
      port: 8100
      keep_versions: 2

Example:
    >>> PolicyServerSettings().url
    'http://127.0.0.1:8100/v1'
    >>> PolicyServerSettings().versioned(3)
    'dpe-policy@v3'
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from dpe.config import CoreSettings, versioned_model
from dpe.section import Section


class PolicyServerSettings(Section):
    """The newest `keep_versions` policy versions served over HTTP: ``model_name`` answers with the newest,
    ``model_name@vN`` with version N while it is loaded, and every answer names the version that made it."""

    engine: Literal["local", "vllm"] = Field(
        "local", description="local: this process loads each version and answers; vllm: a running vLLM server "
        "answers and this process hot-loads each version's LoRA adapter into it (consumers.policy.vllm).")
    vllm_url: str = Field("http://127.0.0.1:8000", description="The vLLM server the vllm engine drives (its root).")
    host: str = Field("127.0.0.1", description="Listen address: loopback unless told (0.0.0.0 in a container).")
    port: int = Field(8100, ge=0, le=65535, description="0: any free port (tests).")
    model_name: str = Field("dpe-policy", pattern=r"^[A-Za-z0-9_.-]+$")
    base_policy: str | None = Field(None, description="Version 0's folder, served until a checkpoint is announced.")
    keep_versions: int = Field(2, ge=1, description="Versions kept loaded, so answers in flight finish on theirs.")
    max_new_tokens: int = Field(64, ge=1, description="Cap on any request's max_tokens.")
    batch_size: int = Field(32, ge=1, description="Requests generated together.")
    batch_window_s: float = Field(0.01, ge=0, description="How long a batch waits for more requests.")
    torch_threads: int | None = Field(None, ge=1, description="torch.set_num_threads; None keeps torch's default.")
    metrics_port: int = Field(9107, ge=0, le=65535, description="Prometheus port (0: none; metrics.port overrides).")

    @property
    def url(self) -> str:
        """The OpenAI base URL clients use."""
        return f"http://{self.host}:{self.port}/v1"

    def versioned(self, version: int) -> str:
        """The model name that asks for policy version `version` itself."""
        return versioned_model(self.model_name, version)


class PolicyServerConfig(CoreSettings):
    """What the policy server reads: the core settings and its own section."""

    policy: PolicyServerSettings = Field(default_factory=PolicyServerSettings)
