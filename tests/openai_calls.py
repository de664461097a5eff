"""Greedy requests through the official OpenAI client, shared by the router and P/D tests."""

from __future__ import annotations

import openai

Answer = tuple[str, int, int]
"""Text, completion tokens, prompt tokens."""


def complete(c: openai.OpenAI, *, model: str, prompt: str, max_tokens: int) -> Answer:
    r = c.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert r.usage is not None
    return r.choices[0].text, r.usage.completion_tokens, r.usage.prompt_tokens


def chat_stream(c: openai.OpenAI, *, model: str, prompt: str, max_tokens: int) -> Answer:
    stream = c.chat.completions.create(
        model=model,
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    usage = chunks[-1].usage
    assert usage is not None
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, usage.completion_tokens, usage.prompt_tokens
