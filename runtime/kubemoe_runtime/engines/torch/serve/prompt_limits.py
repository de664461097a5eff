"""What a prompt may be, checked as cheaply as it can be, and tokenized without stalling the server.

A request body holds up to 8 MB of text (request_body.py's MAX_BODY_BYTES); tokenizing that takes
seconds of CPU. So, in order:

1. A text that cannot fit the context is refused before it is tokenized, where the tokenizer bounds the
   characters one token can stand for (token_bound.py): n characters make at least n / C tokens, and
   n >= C x max_model_len cannot fit. Elsewhere the text is tokenized and counted.
2. A text over INLINE_TOKENIZE_CHARS is tokenized on a worker thread, without the GIL (tokenizer.py), so
   the event loop (/health, streams) and the engine thread run on meanwhile. TOKENIZING_AT_ONCE such
   texts are tokenized at a time (each takes a CPU from the engine's threads), and at most
   MAX_TOKENIZING_CHARS characters wait for or are in tokenization (one text always may): past that a
   request gets 503 (`queue_full`, which the router retries elsewhere) rather than queueing minutes of
   CPU.
3. The ids: none (400), as many as the context or more (400 `context_length_exceeded`, checked before the
   ids are scanned one by one), then each in the vocabulary (400).

Every refusal is OpenAI-shaped (pod/api_error.py's ApiError) and names the parameter.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Final

from kubemoe_runtime.engines.torch.serve.tokenizer import TextTokenizer
from kubemoe_runtime.pod.api_error import ApiError

INLINE_TOKENIZE_CHARS: Final = 1 << 16  # a longer text is tokenized off the event loop
TOKENIZING_AT_ONCE: Final = 1
MAX_TOKENIZING_CHARS: Final = 16 << 20  # two full request bodies: ~20 s of one CPU for a BPE tokenizer


class PromptLimits:
    """Tokenizes prompts for one server and checks them against its context and vocabulary."""

    def __init__(
        self,
        tokenizer: TextTokenizer,
        *,
        max_model_len: int,
        vocab_size: int,
        max_tokenizing_chars: int = MAX_TOKENIZING_CHARS,
    ) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_tokenizing_chars = max_tokenizing_chars
        self.tokenizing_chars = 0  # of the long texts waiting for or in tokenization
        self._turn = asyncio.Semaphore(TOKENIZING_AT_ONCE)

    async def encode(self, text: str, *, param: str, add_special_tokens: bool = True) -> list[int]:
        """`text`'s token ids; ApiError 400 where it provably cannot fit the context, 503 while too much
        other text waits to be tokenized."""
        self.refuse_too_long(text, param=param)
        encode = self.tokenizer.encode
        if len(text) <= INLINE_TOKENIZE_CHARS:
            return encode(text, add_special_tokens=add_special_tokens)
        if self.tokenizing_chars and self.tokenizing_chars + len(text) > self.max_tokenizing_chars:
            raise ApiError(
                503,
                f"the server is busy tokenizing other long prompts ({self.tokenizing_chars} characters; at "
                f"most {self.max_tokenizing_chars} wait at once); try again",
                type="server_error",
                code="queue_full",
                retry_after=1,
            )
        self.tokenizing_chars += len(text)
        try:
            async with self._turn:
                return await asyncio.to_thread(encode, text, add_special_tokens=add_special_tokens)
        finally:
            self.tokenizing_chars -= len(text)

    def refuse_too_long(self, text: str, *, param: str) -> None:
        """ApiError 400 for a text of more characters than max_model_len tokens can stand for."""
        per_token = self.tokenizer.max_chars_per_token
        if per_token is None or len(text) < per_token * self.max_model_len:
            return
        raise ApiError(
            400,
            f"This model's maximum context length is {self.max_model_len} tokens. However, your prompt "
            f"is {len(text)} characters long, at least {len(text) // per_token} tokens (no token of this "
            f"model stands for more than {per_token} characters), leaving no room for a completion.",
            param=param,
            code="context_length_exceeded",
        )

    def check(self, prompt_ids: Sequence[int], *, param: str) -> None:
        """ApiError 400 for an empty prompt, one that leaves no room in the context, or an id outside the
        vocabulary (the length first: it needs no scan of the ids)."""
        if not prompt_ids:
            raise ApiError(400, "the prompt is empty", param=param)
        if len(prompt_ids) >= self.max_model_len:
            raise ApiError(
                400,
                f"This model's maximum context length is {self.max_model_len} tokens. However, your "
                f"prompt has {len(prompt_ids)} tokens, leaving no room for a completion.",
                param=param,
                code="context_length_exceeded",
            )
        vocab = self.vocab_size
        if any(not 0 <= t < vocab for t in prompt_ids):
            raise ApiError(400, f"prompt token ids must be in [0, {vocab})", param=param)
