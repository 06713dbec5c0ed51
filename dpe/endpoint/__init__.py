"""OpenAI-compatible endpoints: one settings model (`settings`), one client (`client`), and a local server
around a tiny policy (`server`) that stands in for vLLM in tests and on CPU."""
