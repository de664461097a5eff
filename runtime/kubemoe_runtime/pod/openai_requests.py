"""The OpenAI wire format's requests the server takes: validated, untrusted.

Requests are parsed strictly from JSON: wrong types, out-of-range values (NaN and Infinity included) and
unsupported options are 400s that name the field. Beyond OpenAI's fields the requests take vLLM's `top_k`,
`stop_token_ids`, `ignore_eos` and `kv_transfer_params` (P/D disaggregation; honoured only when the router
signed them, serve/app.py).

An option the torch engine does not implement is a 400 naming it, what the engine does instead and the fix,
unless its value changes nothing (unsupported_options.py's tables). Other unknown fields are ignored, as
OpenAI and vLLM do: those left (`user`, `metadata`, `store`, `service_tier`, `priority`,
`parallel_tool_calls`, ...) do not change the generated text. `null` is every optional field's default,
as OpenAI and vLLM read it (`"stream": null` streams nothing, `"n": null` is one choice).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from kubemoe_runtime.pod.unsupported_options import (
    CHAT_UNSUPPORTED,
    COMPLETION_UNSUPPORTED,
    MESSAGE_UNSUPPORTED,
    SAMPLING_UNSUPPORTED,
    Unsupported,
)

MAX_STOP_STRINGS = 16
MIN_SEED, MAX_SEED = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed takes (sampling.py)
MAX_STOP_TOKEN_IDS = 1024


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
