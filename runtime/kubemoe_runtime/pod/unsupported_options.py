"""The options of the OpenAI and vLLM requests that the torch engine does not implement (openai_requests.py
refuses them): for each, the values that change nothing, what the engine does instead, and the fix.

An option the torch engine does not implement (OpenAI's `response_format` JSON mode, `logit_bias`, tools,
log probabilities, `n` > 1, ...; vLLM's guided decoding, beam search, `min_p`, ...: the tables below) is a
400 naming it, what the engine does instead and the fix (leave it out, or serve with engine.kind: vllm),
unless its value changes nothing (null, false, its default: `response_format: {"type": "text"}`,
`tool_choice: "none"`, `n: 1`): the answer never silently differs from what was asked.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

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
