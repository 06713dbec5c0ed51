"""OpenAI-compatible chat endpoints for the diagnosis producers (judge, reference models).

One client per configured endpoint (vLLM, OpenAI, `transformers serve`, any compatible server);
images travel as PNG data URLs inside the chat message.

Example:
    >>> from PIL import Image
    >>> image_data_url(Image.new("RGB", (2, 2))).startswith("data:image/png;base64,")
    True
"""

from __future__ import annotations

import base64
import io
from typing import Any

import httpx2
from openai import OpenAI
from PIL import Image

from producers.diagnosis_settings import EndpointSettings


def openai_client(endpoint: EndpointSettings, http_client: httpx2.Client | None = None) -> OpenAI:
    """A synchronous client for `endpoint` (`http_client` lets a test serve the HTTP edge itself)."""
    return OpenAI(
        base_url=endpoint.base_url,
        api_key=endpoint.api_key.get_secret_value(),
        timeout=endpoint.timeout_s,
        max_retries=endpoint.max_retries,
        http_client=http_client,
    )


def image_data_url(image: Image.Image) -> str:
    """The image as a ``data:image/png;base64,...`` URL."""
    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat(client: OpenAI, endpoint: EndpointSettings, messages: list[dict[str, Any]]) -> str:
    """The text of one deterministic (temperature 0) chat completion; '' when the reply has none."""
    response = client.chat.completions.create(
        model=endpoint.model,
        messages=messages,  # type: ignore[arg-type]
        temperature=0.0,
        max_tokens=endpoint.max_tokens,
    )
    if not response.choices:
        return ""
    return response.choices[0].message.content or ""
