"""What the router reads of a request, and the checks it makes itself.

The router checks only what it must read: the API key, a JSON object as the body (at most MAX_BODY_BYTES,
413 past it), the prompt or messages, `stream` and the model name; disaggregated, also the fields it
overwrites in the prefill's request (`check_prefill_fields`). The engines validate the rest, and
their 4xx answers pass through unchanged (the torch engine refuses the options it does not implement,
naming them: pod/unsupported_options.py). Paths under NOT_FORWARDED (the operator's expert load and
placement, the KV hand-off between pods) never reach a backend, however spelt.

From the prompt it estimates two things without a tokenizer: its length in tokens (disaggregated, a
prompt shorter than --pd-min-prompt-tokens skips the KV hand-off) and the key prefix-hash hashes (the
prompt's start).
"""

from __future__ import annotations

import json
import posixpath
from collections.abc import Sequence
from typing import Any

from starlette.requests import Request

from kubemoe_runtime.pod.api_error import ApiError
from kubemoe_runtime.router.auth import ApiKeys

MAX_BODY_BYTES = 8 * 1024 * 1024
PREFIX_KEY_CHARS = 512  # what prefix-hash hashes: the start of the prompt
ENGINE_PATHS = ("/tokenize", "/detokenize", "/version")  # vLLM's, outside /v1: forwarded
NOT_FORWARDED = ("/v1/experts", "/v1/kv")  # the operator's expert load and placement; the KV hand-off


def authorize(keys: ApiKeys | None, request: Request) -> None:
    """401 unless the request carries one of `keys` (None: no key needed)."""
    if keys is not None and not keys.allows(request.headers.get("authorization")):
        raise ApiError(401, "Incorrect or missing API key.", code="invalid_api_key")


def check_generation(body: dict[str, Any], *, prompt_field: str, served_names: Sequence[str]) -> None:
    """400 (or 404 for another model) unless a completions or chat body has what the router reads."""
    if prompt_field not in body:
        raise ApiError(400, f"{prompt_field}: Field required", param=prompt_field)
    prompt = body[prompt_field]
    if prompt_field == "messages" and (not isinstance(prompt, list) or not prompt):
        raise ApiError(400, "messages: must be a non-empty list", param="messages")
    if prompt_field == "prompt" and not isinstance(prompt, str | list):
        raise ApiError(400, "prompt: must be a string or a list", param="prompt")
    if body.get("stream") is not None and not isinstance(body["stream"], bool):  # null: the default
        raise ApiError(400, "stream: Input should be a valid boolean", param="stream")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise ApiError(400, "model: Input should be a valid string", param="model")
    if model is not None and served_names and model not in served_names:
        raise ApiError(404, f"The model `{model}` does not exist.", param="model", code="model_not_found")


def check_prefill_fields(body: dict[str, Any], *, chat: bool) -> None:
    """Disaggregated: 400, worded as the torch engine words it (pod/openai_requests.py), for a field the
    engine refuses and the router overwrites in the prefill's request (the completion's length,
    stream_options): else only the decode would refuse it, after the prefill computed the whole prompt and
    parked its KV. A length is a positive integer, not a boolean or 5.0 (the engine parses strictly);
    stream_options an object whose include_usage is a boolean; null is the default of each.
    max_completion_tokens is chat's alone (the completions endpoint ignores it)."""
    for name in ("max_tokens", "max_completion_tokens") if chat else ("max_tokens",):
        _check_length(body.get(name), name=name)
    options = body.get("stream_options")
    if options is None:
        return
    if not isinstance(options, dict):
        raise ApiError(400, "stream_options: Input should be an object", param="stream_options")
    usage = options.get("include_usage")
    if usage is not None and not isinstance(usage, bool):
        raise ApiError(
            400, "stream_options.include_usage: Input should be a valid boolean", param="stream_options"
        )


def _check_length(value: Any, *, name: str) -> None:
    if value is None:
        return
    if type(value) is not int:  # JSON gives no other int subclass than bool
        raise ApiError(400, f"{name}: Input should be a valid integer", param=name)
    if value < 1:
        raise ApiError(400, f"{name}: Input should be greater than or equal to 1", param=name)


def completion_limit(body: dict[str, Any], *, chat: bool) -> Any:
    """The completion's length as the engine reads it: chat's max_completion_tokens unless absent or null,
    else max_tokens (None: not given)."""
    if chat and body.get("max_completion_tokens") is not None:
        return body["max_completion_tokens"]
    return body.get("max_tokens")


def not_forwarded(path: str) -> bool:
    """A path the router never forwards: under NOT_FORWARDED, however spelt (`/v1//experts/../experts`)."""
    normal = posixpath.normpath("/" + path.lstrip("/"))
    return any(p == root or p.startswith(root + "/") for p in (path, normal) for root in NOT_FORWARDED)


async def read_body(request: Request) -> bytes:
    """The body, at most MAX_BODY_BYTES (413 past it)."""
    declared = request.headers.get("content-length", "0")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        parts.append(part)
        size += len(part)
        if size > MAX_BODY_BYTES:
            raise ApiError(413, f"the request body exceeds {MAX_BODY_BYTES} bytes")
    return b"".join(parts)


async def read_json(request: Request) -> tuple[dict[str, Any], bytes]:
    """The body as a JSON object, and as it came (what goes upstream when the router changes nothing)."""
    data = await read_body(request)
    try:
        body = json.loads(data)
    except RecursionError as err:
        raise ApiError(400, "the body is not valid JSON: it is nested too deeply") from err
    except ValueError as err:  # not JSON, not UTF-8/16/32, a number of thousands of digits
        raise ApiError(400, f"the body is not valid JSON: {err}") from err
    if not isinstance(body, dict):
        raise ApiError(400, "the body must be a JSON object")
    return body, data


def json_object(data: bytes | None) -> dict[str, Any]:
    """`data` as a JSON object; {} for anything else (a backend's answer, read leniently)."""
    try:
        value = json.loads(data or b"{}")
    except (ValueError, RecursionError):  # not JSON, not UTF-8/16/32, huge numbers, deep nesting
        return {}
    return value if isinstance(value, dict) else {}


def dumps(body: dict[str, Any]) -> bytes:
    try:
        return json.dumps(body, separators=(",", ":")).encode()
    except RecursionError as err:  # parsed a few frames up the stack, but too deep to write out here
        raise ApiError(400, "the body is nested too deeply") from err


def prompt_tokens_estimate(prompt: Any, *, nested: bool = False) -> int:
    """A prompt's tokens, without a tokenizer: exact for token ids, else UTF-8 bytes / 4 (about what
    BPE vocabularies give English text; code and other scripts give more tokens per byte, so the
    estimate errs towards P/D). Messages count their text parts. A list in a list is a batch entry
    (token ids); deeper lists are no prompt and count nothing (the engine refuses them)."""
    if isinstance(prompt, str):
        return len(prompt.encode("utf-8", "surrogatepass")) // 4  # a lone surrogate counts too
    if isinstance(prompt, list):
        if all(isinstance(t, int) for t in prompt):
            return len(prompt)
        if nested:
            return 0
        return sum(prompt_tokens_estimate(_text_of(item), nested=True) for item in prompt)
    return 0


def _text_of(item: Any) -> Any:
    """A message's content (a string, or the text of its parts), or a batch entry as it is."""
    if not isinstance(item, dict):
        return item
    content = item.get("content")
    if isinstance(content, list):
        return "".join(
            p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str)
        )
    return content if isinstance(content, str) else ""


def prefix_key(prompt: Any) -> str:
    """What prefix-hash hashes: the prompt's start; "" (no affinity) for one nested too deeply to show."""
    try:
        return _prefix_text(prompt)
    except RecursionError:
        return ""


def _prefix_text(prompt: Any) -> str:
    if isinstance(prompt, str):
        return prompt[:PREFIX_KEY_CHARS]
    if isinstance(prompt, list) and all(isinstance(m, dict) for m in prompt):
        parts: list[str] = []
        for message in prompt:
            content = message.get("content")
            if isinstance(content, list):
                content = "".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            parts.append(f"{message.get('role')}:{content}")
        return "\n".join(parts)[:PREFIX_KEY_CHARS]
    return json.dumps(prompt, separators=(",", ":"))[:PREFIX_KEY_CHARS]


def forward_key(body: bytes, content_type: str) -> str:
    """What prefix-hash hashes for a forwarded request: a JSON body's prompt, messages or input."""
    if "json" not in content_type or not body:
        return ""
    found = json_object(body)
    for name in ("prompt", "messages", "input"):
        if name in found:
            return prefix_key(found[name])
    return ""
