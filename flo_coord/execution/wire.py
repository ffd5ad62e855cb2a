"""The streamed chunk shapes of the backends' wire protocols, as msgspec Structs.

The adapters in ``backends.py`` decode each SSE ``data:`` payload or NDJSON line straight into
these types (one ``msgspec.json.Decoder`` per shape), so a chunk of the wrong shape is a
``msgspec.ValidationError`` (a ``MalformedChunkError`` to the Coordinator) and the parsers
read attributes instead of digging through dicts. Every Struct ignores fields it does not
name (providers add fields freely) and every field is optional unless the protocol makes it
required, so what a server leaves out never breaks a stream. A bare JSON string decodes as
``str`` (a keep-alive such as ``"ping"`` sent as JSON).

Sources: OpenAI's chat completion chunk and completions stream objects (platform.openai.com
API reference, "The chat completion chunk object"), the extensions vLLM, llama.cpp, TGI and
DeepSeek add (``reasoning_content``, ``reasoning``); Ollama's ``/api/chat`` and
``/api/generate`` streaming responses (github.com/ollama/ollama docs/api.md); Anthropic's
Messages streaming events (docs.anthropic.com "Streaming Messages").
"""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import UNSET, UnsetType

__all__ = [
    "UNSET",
    "AnthropicBlock",
    "AnthropicDelta",
    "AnthropicEvent",
    "AnthropicMessage",
    "Delta",
    "OllamaChunk",
    "OpenAIChoice",
    "OpenAIChunk",
    "anthropic_event",
    "ollama_chunk",
    "openai_chunk",
]


class Delta(msgspec.Struct):
    """What one chunk adds to a chat answer: OpenAI's ``choices[0].delta``, also Ollama's
    ``message`` (same fields). ``content``: answer text; ``reasoning_content`` (vLLM,
    DeepSeek), ``reasoning`` (OpenRouter, llama.cpp) and ``thinking`` (Ollama): reasoning
    text; ``tool_calls`` / ``function_call``: a tool call being streamed."""

    content: str | None = None
    reasoning_content: str | None = None
    reasoning: str | None = None
    thinking: str | None = None
    tool_calls: list[Any] | None = None
    function_call: dict[str, Any] | None = None


class OpenAIChoice(msgspec.Struct):
    """One entry of ``choices``: ``delta`` (chat) or ``text`` (completions), and
    ``finish_reason`` once the answer ended (None before)."""

    delta: Delta | None = None
    text: str | None = None
    finish_reason: str | None = None


class OpenAIChunk(msgspec.Struct):
    """One SSE ``data:`` object of an OpenAI-compatible stream.

    ``choices`` and ``usage`` are UNSET when absent (a chunk needs one of them; a usage-only
    chunk has ``choices: []``); ``usage`` holds token counts (``prompt_tokens``,
    ``completion_tokens``, ``total_tokens``; nested details are dropped by the parser).
    ``error`` is an in-band error (an object or a string: OpenAI, vLLM, Anthropic shapes).
    ``object``/``type``/``event`` name keep-alive frames ("ping", "keep-alive", ...).
    """

    choices: list[OpenAIChoice] | UnsetType | None = UNSET
    usage: dict[str, Any] | UnsetType | None = UNSET
    model: str | None = None
    error: Any = None
    object: str | None = None
    type: str | None = None
    event: str | None = None


class OllamaChunk(msgspec.Struct):
    """One NDJSON line of Ollama's ``/api/chat`` (``message``) or ``/api/generate``
    (``response``, ``thinking``) stream.

    ``done`` is required on every line but an error line (``{"error": "..."}``); the done line
    carries ``done_reason`` ("stop", "length"; absent before Ollama 0.1.33), ``model`` and the
    token counts ``prompt_eval_count``/``eval_count``.
    """

    done: bool | None = None
    message: Delta | None = None
    response: str | None = None
    thinking: str | None = None
    done_reason: str | None = None
    model: str | None = None
    prompt_eval_count: int | None = None
    eval_count: int | None = None
    error: Any = None
    type: str | None = None
    object: str | None = None
    event: str | None = None


class AnthropicMessage(msgspec.Struct):
    """``message_start``'s ``message``: the ``model`` and the first ``usage`` (input_tokens)."""

    model: str | None = None
    usage: dict[str, Any] | None = None


class AnthropicDelta(msgspec.Struct):
    """``content_block_delta``'s delta (``type`` text_delta with ``text``, thinking_delta,
    signature_delta, input_json_delta) or ``message_delta``'s (``stop_reason``)."""

    type: str | None = None
    text: str | None = None
    stop_reason: str | None = None


class AnthropicBlock(msgspec.Struct):
    """``content_block_start``'s block: its ``type`` ("text", "thinking", "tool_use")."""

    type: str | None = None


class AnthropicEvent(msgspec.Struct):
    """One Messages API stream event. ``type`` is required: message_start, content_block_start,
    content_block_delta, content_block_stop, message_delta (``delta.stop_reason`` and the
    cumulative ``usage``), message_stop, ping, error (``error``); types added later are skipped
    by the parser."""

    type: str
    message: AnthropicMessage | None = None
    delta: AnthropicDelta | None = None
    content_block: AnthropicBlock | None = None
    usage: dict[str, Any] | None = None
    error: Any = None


#: Decoders of one payload each; a bare JSON string (a keep-alive) decodes as ``str``.
openai_chunk = msgspec.json.Decoder(OpenAIChunk | str).decode
ollama_chunk = msgspec.json.Decoder(OllamaChunk | str).decode
anthropic_event = msgspec.json.Decoder(AnthropicEvent).decode
