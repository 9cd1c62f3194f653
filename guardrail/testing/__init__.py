"""Helpers for testing guardrail and plugins built on it: scripted monitors and streams
(this module), a loopback OpenAI-compatible SSE server (``guardrail.testing.upstream``) and tiny
random models with a freshly trained BPE tokenizer (``guardrail.testing.tiny_models``)."""
