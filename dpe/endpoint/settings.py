"""Where an OpenAI-compatible endpoint is and how to talk to it: one settings model for every caller.

The agents' roles, the evaluator's judge and the auditor's references all describe their endpoint
(vLLM, OpenAI, `transformers serve`, `dpe.endpoint.server`) with `EndpointSettings`, and all call it
through `dpe.endpoint.client.EndpointClient`. The defaults are the judge's and the references'
(deterministic, one retry, four requests in flight); a caller that wants others sets them in its
own section's default (the agents' ``agents.llm``).

Example:
    >>> endpoint = EndpointSettings(base_url="http://vllm:8000/v1", model="qwen")
    >>> endpoint.api_key, endpoint.temperature, endpoint.max_retries, endpoint.concurrency
    (SecretStr('**********'), 0.0, 1, 4)
"""

from __future__ import annotations

from pydantic import Field, SecretStr

from dpe.section import Section


class EndpointSettings(Section):
    """An OpenAI-compatible chat endpoint (vLLM, OpenAI, `transformers serve`, ...) and the policy to call it."""

    base_url: str = Field(min_length=1, description="e.g. http://vllm:8000/v1")
    model: str = Field(min_length=1, description="The served model's name.")
    api_key: SecretStr = Field(SecretStr("EMPTY"), description="Local servers accept any key.")
    timeout_s: float = Field(30.0, gt=0, description="Per request.")
    max_retries: int = Field(1, ge=0, description="Retries after a timeout, 429, 5xx or lost connection.")
    backoff_s: float = Field(0.5, ge=0, description="First retry delay; doubles each time, with jitter.")
    backoff_max_s: float = Field(8.0, ge=0, description="Longest retry delay, also the cap on a Retry-After.")
    concurrency: int = Field(4, ge=1, description="Requests in flight at most, per client.")
    temperature: float = Field(0.0, ge=0, description="0: deterministic replies.")
    max_tokens: int = Field(256, ge=1)
    output_retries: int = Field(2, ge=0, description="Re-asks after output that is not the JSON asked for.")
    structured_output: bool = Field(True, description="Send the JSON schema of a structured reply as response_format.")
