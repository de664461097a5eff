"""The OpenAI wire format the server speaks: requests (validated, untrusted) and responses.

Requests are parsed strictly from JSON: wrong types, out-of-range values (NaN and Infinity included) and
unsupported options are 400s that name the field. Beyond OpenAI's fields the requests take vLLM's `top_k`,
`stop_token_ids`, `ignore_eos` and `kv_transfer_params` (P/D disaggregation; honoured only when the router
signed them, serve/app.py).

An option the torch engine does not implement (OpenAI's `response_format` JSON mode, `logit_bias`, tools,
log probabilities, `n` > 1, ...; vLLM's guided decoding, beam search, `min_p`, ...: the tables below) is a
400 naming it, what the engine does instead and the fix (leave it out, or serve with engine.kind: vllm),
unless its value changes nothing (null, false, its default: `response_format: {"type": "text"}`,
`tool_choice: "none"`, `n: 1`): the answer never silently differs from what was asked. Other unknown fields
are ignored, as OpenAI and vLLM do: those left (`user`, `metadata`, `store`, `service_tier`, `priority`,
`parallel_tool_calls`, ...) do not change the generated text. `null` is every optional field's default,
as OpenAI and vLLM read it (`"stream": null` streams nothing, `"n": null` is one choice).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_serializer
from pydantic_core import PydanticCustomError

MAX_STOP_STRINGS = 16
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes (sampling.py)
MAX_STOP_TOKEN_IDS = 1024
VLLM_FIX = "leave it out, or serve the model with engine.kind: vllm"


@dataclass(frozen=True)
class Unsupported:
    """An option the torch engine does not implement: the values that change nothing, what the engine
    does instead, and what to do."""

    harmless: tuple[Any, ...]
    instead: str
    fix: str = VLLM_FIX

    def allows(self, value: Any) -> bool:
        return any(_same(value, h) for h in self.harmless)

    def message(self, value: Any) -> str:
        shown = json.dumps(value, default=str)
        shown = shown if len(shown) <= 80 else f"{shown[:80]}..."
        return f"{shown} is not supported by the torch engine ({self.instead}); {self.fix}"


def _same(value: Any, harmless: Any) -> bool:
    """JSON equality that tells booleans from numbers (`true` is no `1`) and 1.0 from nothing else."""
    if isinstance(value, bool) or isinstance(harmless, bool) or value is None or harmless is None:
        return value is harmless
    if isinstance(value, int | float) and isinstance(harmless, int | float):
        return value == harmless
    if isinstance(value, dict) and isinstance(harmless, dict):
        return value.keys() == harmless.keys() and all(_same(value[k], harmless[k]) for k in value)
    if isinstance(value, list) and isinstance(harmless, list):
        return len(value) == len(harmless) and all(_same(a, b) for a, b in zip(value, harmless, strict=True))
    return type(value) is type(harmless) and bool(value == harmless)


NO_LOGPROBS = "it returns no log probabilities"
NO_GUIDED = "it answers free text: no JSON mode, JSON schema or guided decoding"
NO_TOOLS = "it does not call tools or functions"
NO_PENALTY = "it applies no penalties"
TEMPLATE = "it renders the checkpoint's own chat template with the messages only"
SAMPLING_UNSUPPORTED: dict[str, Unsupported] = {
    # OpenAI's
    "n": Unsupported(
        (1,),
        "one choice per request",
        "send that many requests (with different seeds), or serve the model with engine.kind: vllm",
    ),
    "presence_penalty": Unsupported(
        (0,), NO_PENALTY, "leave it at 0, or serve the model with engine.kind: vllm"
    ),
    "frequency_penalty": Unsupported(
        (0,), NO_PENALTY, "leave it at 0, or serve the model with engine.kind: vllm"
    ),
    "logit_bias": Unsupported((None, {}), "it applies no logit bias"),
    "response_format": Unsupported((None, {"type": "text"}), NO_GUIDED),
    # vLLM's
    "guided_json": Unsupported((None,), NO_GUIDED),
    "guided_regex": Unsupported((None,), NO_GUIDED),
    "guided_choice": Unsupported((None,), NO_GUIDED),
    "guided_grammar": Unsupported((None,), NO_GUIDED),
    "structured_outputs": Unsupported((None,), NO_GUIDED),
    "use_beam_search": Unsupported((None, False), "it samples; no beam search"),
    "min_p": Unsupported((None, 0), "it samples with temperature, top_p and top_k only"),
    "repetition_penalty": Unsupported((None, 1), NO_PENALTY),
    "min_tokens": Unsupported((None, 0), "it sets no minimum length"),
    "bad_words": Unsupported((None, []), "it bans no words"),
    "allowed_token_ids": Unsupported((None,), "it restricts no tokens"),
    "logits_processors": Unsupported((None, []), "it runs no logits processors"),
    "include_stop_str_in_output": Unsupported((None, False), "it always cuts a stop string from the answer"),
    "skip_special_tokens": Unsupported((None, True), "it always leaves special tokens out of the text"),
    "truncate_prompt_tokens": Unsupported(
        (None,), "it truncates no prompt: one longer than the context is a 400", "shorten the prompt"
    ),
    "prompt_logprobs": Unsupported((None,), NO_LOGPROBS),
    "return_tokens_as_token_ids": Unsupported((None, False), "it returns text only"),
    "return_token_ids": Unsupported((None, False), "it returns text only"),
}
COMPLETION_UNSUPPORTED: dict[str, Unsupported] = {
    "echo": Unsupported((None, False), "it does not echo the prompt"),
    "logprobs": Unsupported((None,), NO_LOGPROBS),
    "best_of": Unsupported((None, 1), "one candidate per choice"),
    "suffix": Unsupported((None, ""), "it completes after the prompt only; no insertion"),
    "add_special_tokens": Unsupported(
        (None, True),
        "a text prompt is tokenized with the model's special tokens",
        "send the prompt as token ids, or serve the model with engine.kind: vllm",
    ),
    "prompt_embeds": Unsupported((None,), "a prompt is text or token ids"),
}
CHAT_UNSUPPORTED: dict[str, Unsupported] = {
    "logprobs": Unsupported((None, False), NO_LOGPROBS),
    "top_logprobs": Unsupported((None, 0), NO_LOGPROBS),
    "tools": Unsupported((None, []), NO_TOOLS),
    "tool_choice": Unsupported((None, "none", "auto"), NO_TOOLS),
    "functions": Unsupported((None, []), NO_TOOLS),
    "function_call": Unsupported((None, "none", "auto"), NO_TOOLS),
    "audio": Unsupported((None,), "it answers text only"),
    "modalities": Unsupported((None, ["text"]), "it answers text only"),
    "web_search_options": Unsupported((None,), "it searches nothing"),
    "reasoning_effort": Unsupported((None,), TEMPLATE),
    "chat_template": Unsupported((None,), TEMPLATE),
    "chat_template_kwargs": Unsupported((None, {}), TEMPLATE),
    "documents": Unsupported((None, []), TEMPLATE),
    "add_generation_prompt": Unsupported((None, True), "it always opens the assistant's turn"),
    "continue_final_message": Unsupported((None, False), "it always opens the assistant's turn"),
    "echo": Unsupported((None, False), "it does not echo the last message"),
    "add_special_tokens": Unsupported((None, False), "it tokenizes the chat template's text as written"),
}
MESSAGE_UNSUPPORTED: dict[str, Unsupported] = {
    "tool_calls": Unsupported((None, []), NO_TOOLS),
    "function_call": Unsupported((None,), NO_TOOLS),
}


def _null_is_default(model: type[BaseModel], value: Any, info: ValidationInfo) -> Any:
    """`null` for a field whose type has no null: its default, as OpenAI and vLLM read it."""
    return model.model_fields[info.field_name or ""].default if value is None else value


def _refuse_unsupported(value: Any, info: ValidationInfo, table: dict[str, Unsupported]) -> Any:
    option = table[info.field_name or ""]
    if not option.allows(value):
        raise PydanticCustomError("unsupported_option", "{message}", {"message": option.message(value)})
    return value


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True, strict=True, allow_inf_nan=False)


StopString = Annotated[str, Field(min_length=1, max_length=256)]


class StreamOptions(_Request):
    include_usage: bool = False

    @field_validator("include_usage", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        return _null_is_default(cls, value, info)


class SamplingRequest(_Request):
    """Fields both endpoints share."""

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = Field(default=None, ge=MIN_SEED, le=MAX_SEED)
    top_k: int | None = Field(default=None, ge=-1)  # vLLM's: -1 or 0 for every token
    stop: StopString | list[StopString] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = Field(
        default=None, max_length=MAX_STOP_TOKEN_IDS
    )
    ignore_eos: bool = False
    kv_transfer_params: dict[str, Any] | None = None
    # Options the torch engine refuses unless harmless (SAMPLING_UNSUPPORTED).
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Any = None
    response_format: Any = None
    guided_json: Any = None
    guided_regex: Any = None
    guided_choice: Any = None
    guided_grammar: Any = None
    structured_outputs: Any = None
    use_beam_search: Any = None
    min_p: Any = None
    repetition_penalty: Any = None
    min_tokens: Any = None
    bad_words: Any = None
    allowed_token_ids: Any = None
    logits_processors: Any = None
    include_stop_str_in_output: Any = None
    skip_special_tokens: Any = None
    truncate_prompt_tokens: Any = None
    prompt_logprobs: Any = None
    return_tokens_as_token_ids: Any = None
    return_token_ids: Any = None

    @field_validator("stream", "ignore_eos", "n", "presence_penalty", "frequency_penalty", mode="before")
    @classmethod
    def _sampling_null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        return _null_is_default(cls, value, info)

    @field_validator(*SAMPLING_UNSUPPORTED)
    @classmethod
    def _sampling_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_unsupported(value, info, SAMPLING_UNSUPPORTED)

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop strings")
        return stop

    def stop_strings(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(SamplingRequest):
    prompt: str | list[int] | list[str] | list[list[int]]
    # Options the torch engine refuses unless harmless (COMPLETION_UNSUPPORTED).
    echo: bool = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    add_special_tokens: Any = None
    prompt_embeds: Any = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(
        cls, prompt: str | list[int] | list[str] | list[list[int]]
    ) -> str | list[int] | list[str] | list[list[int]]:
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int) and len(prompt) != 1:
            raise ValueError("send one prompt per request (batched prompts are not supported)")
        return prompt

    @field_validator("echo", mode="before")
    @classmethod
    def _completion_null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        return _null_is_default(cls, value, info)

    @field_validator(*COMPLETION_UNSUPPORTED)
    @classmethod
    def _completion_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_unsupported(value, info, COMPLETION_UNSUPPORTED)

    def single_prompt(self) -> str | list[int]:
        """The prompt as text or token ids (a one-element batch unwrapped)."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return prompt
        if prompt and isinstance(prompt[0], str | list):
            return prompt[0]  # validated: exactly one
        return [int(t) for t in prompt]  # type: ignore[arg-type]  # list[int] here


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    # An assistant's earlier tool calls: refused, as tools are (MESSAGE_UNSUPPORTED).
    tool_calls: Any = None
    function_call: Any = None

    @field_validator(*MESSAGE_UNSUPPORTED)
    @classmethod
    def _message_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_unsupported(value, info, MESSAGE_UNSUPPORTED)

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    # Options the torch engine refuses unless harmless (CHAT_UNSUPPORTED).
    logprobs: bool = False
    top_logprobs: int | None = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    audio: Any = None
    modalities: Any = None
    web_search_options: Any = None
    reasoning_effort: Any = None
    chat_template: Any = None
    chat_template_kwargs: Any = None
    documents: Any = None
    add_generation_prompt: Any = None
    continue_final_message: Any = None
    echo: Any = None
    add_special_tokens: Any = None

    @field_validator("logprobs", mode="before")
    @classmethod
    def _chat_null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        return _null_is_default(cls, value, info)

    @field_validator(*CHAT_UNSUPPORTED)
    @classmethod
    def _chat_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        return _refuse_unsupported(value, info, CHAT_UNSUPPORTED)

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


# --- responses -------------------------------------------------------------------------------------

FinishReason = Literal["stop", "length", "abort"]


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
    finish_reason: FinishReason | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None
    kv_transfer_params: dict[str, Any] | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: None = None
    finish_reason: FinishReason | None


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    kv_transfer_params: dict[str, Any] | None = None


class ChatDelta(BaseModel):
    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present_only(self) -> dict[str, str]:
        """OpenAI sends only the fields a delta carries: {"content": "..."}, or {} at the end."""
        return {k: v for k, v in (("role", self.role), ("content", self.content)) if v is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChatDelta
    logprobs: None = None
    finish_reason: FinishReason | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "kubemoe"
    root: str
    max_model_len: int | None  # None: the router has not learned it from a backend yet


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorBody(BaseModel):
    error: ErrorDetail


class ApiError(Exception):
    """An error the client caused or should retry, answered in OpenAI's shape. `retry_after` (seconds): a
    refusal worth retrying soon (busy, loading, no backend yet) says when, as a Retry-After header."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        retry_after: int | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.detail = ErrorDetail(message=message, type=type, param=param, code=code)
        self.retry_after = retry_after

    def body(self) -> dict[str, Any]:
        return ErrorBody(error=self.detail).model_dump()

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after)} if self.retry_after is not None else {}
