"""The policy server's vLLM engine (``policy.engine: vllm``): each version's LoRA adapter hot-loaded into vLLM.

On GPUs the policy is served by vLLM's OpenAI-compatible server, started on the base model with LoRA enabled and
runtime updates allowed, the base served as version 0::

    VLLM_ALLOW_RUNTIME_LORA_UPDATING=True vllm serve /models/base --served-model-name dpe-policy@v0 \\
        --enable-lora --max-loras 2 --max-lora-rank 8

`dpe serve policy` then answers nothing itself: it follows the checkpoints and loads each newer version's adapter
into vLLM (``POST /v1/load_lora_adapter``) under the version's name, ``dpe-policy@vN``, which vLLM lists and names in
every reply, and unloads the versions beyond ``policy.keep_versions``. The evaluator, the band and the auditor ask
vLLM (``inference.url``) as they would ask the project's own server. vLLM hot-loads adapters only: a full checkpoint
past version 0, or an adapter trained on another base than the one vLLM serves, is refused with the reason.

Example:
    >>> adapters = VllmAdapters(PolicyServerSettings(engine="vllm"))
    >>> adapters.newest is None, adapters.settings.vllm_url
    (True, 'http://127.0.0.1:8000')
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx2

from consumers.policy.settings import PolicyServerSettings
from dpe.policy.checkpoints import loadable_folder
from dpe.policy.weights import adapter_base


class NotHotLoadable(ValueError):
    """A checkpoint vLLM cannot hot-load: full weights past version 0, or an adapter of another base."""


class VllmUnavailable(RuntimeError):
    """vLLM did not answer, or refused an adapter (its message says why)."""


class VllmAdapters:
    """The versions a running vLLM serves: its base as version 0, and the newest `keep_versions` adapters."""

    def __init__(self, settings: PolicyServerSettings, http: httpx2.AsyncClient | None = None):
        self.settings = settings
        self.http = http or httpx2.AsyncClient(base_url=settings.vllm_url, timeout=300.0)
        self.adapters: list[int] = []
        """The adapter versions loaded into vLLM by this process, oldest first."""
        self.newest: int | None = None

    async def load(self, version: int, uri: str, roots: Sequence[Path] | None) -> None:
        """Serve `version`, whose checkpoint is at `uri` (refused outside `roots`, when given); raises
        `NotHotLoadable`, `VllmUnavailable` and what `loadable_folder` raises."""
        folder = loadable_folder(uri, roots)
        base = adapter_base(folder)
        served_base, served_root = await self._base()
        if base is None:
            if version != 0:
                raise NotHotLoadable(f"v{version} is a full checkpoint: vLLM hot-loads LoRA adapters only (train "
                                     "with --lora, or serve with policy.engine: local)")
            if served_base != self.settings.versioned(0):
                raise NotHotLoadable(f"vLLM serves its base as {served_base!r}, not {self.settings.versioned(0)!r}: "
                                     f"start it with --served-model-name {self.settings.versioned(0)}")
        else:
            if served_root is not None and Path(served_root) != base:
                raise NotHotLoadable(f"v{version}'s adapter was trained on {base}; vLLM serves {served_root}")
            name = self.settings.versioned(version)
            await self._post("/v1/load_lora_adapter", {"lora_name": name, "lora_path": str(folder)})
            self.adapters = sorted([*self.adapters, version])
            for old in self.adapters[:-self.settings.keep_versions]:
                await self._post("/v1/unload_lora_adapter", {"lora_name": self.settings.versioned(old)})
                self.adapters.remove(old)
        self.newest = max(version, self.newest or 0)

    async def close(self) -> None:
        await self.http.aclose()

    async def _base(self) -> tuple[str, str | None]:
        """The name vLLM serves its base model under, and the folder it loaded it from (when it says)."""
        models = (await self._request("GET", "/v1/models")).json()["data"]
        bases = [model for model in models if not model.get("parent")]
        if not bases:
            raise VllmUnavailable(f"vLLM at {self.settings.vllm_url} lists no base model")
        return bases[0]["id"], bases[0].get("root")

    async def _post(self, path: str, body: dict[str, Any]) -> None:
        await self._request("POST", path, json=body)

    async def _request(self, method: str, path: str, **options: Any) -> httpx2.Response:
        try:
            response = await self.http.request(method, path, **options)
        except httpx2.HTTPError as error:
            raise VllmUnavailable(f"vLLM at {self.settings.vllm_url}: {type(error).__name__}: {error}") from None
        if response.is_error:
            raise VllmUnavailable(f"vLLM refused {method} {path} (HTTP {response.status_code}): "
                                  f"{response.text[:500]}")
        return response
