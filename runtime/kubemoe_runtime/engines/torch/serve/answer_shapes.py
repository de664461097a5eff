"""How each OpenAI endpoint words the torch engine's answer: its stream chunks (sent as server-sent
events by `sse`), the usage chunk, and the whole response."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel
from starlette.responses import StreamingResponse

from kubemoe_runtime.engines.torch.serve.in_flight import usage
from kubemoe_runtime.engines.torch.serve.scheduler import Output
from kubemoe_runtime.pod.openai_responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatDelta,
    Completion,
    CompletionChoice,
    FinishReason,
    Usage,
)


class AnswerShape:
    """How one endpoint words its answer: stream chunks, the usage chunk, the whole response."""

    prefix = ""

    def __init__(self, *, model: str) -> None:
        self.model = model
        self.id = f"{self.prefix}-{uuid.uuid4().hex}"
        self.created = int(time.time())

    def chunk(self, text: str, reason: FinishReason | None) -> BaseModel:
        raise NotImplementedError

    def usage_chunk(self, usage: Usage) -> BaseModel:
        raise NotImplementedError

    def opening(self) -> BaseModel | None:
        return None

    def whole(self, text: str, last: Output, *, kv_transfer_params: dict[str, Any] | None) -> BaseModel:
        raise NotImplementedError


class CompletionShape(AnswerShape):
    prefix = "cmpl"

    def chunk(self, text: str, reason: FinishReason | None) -> BaseModel:
        choice = CompletionChoice(text=text, finish_reason=reason)
        return Completion(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return Completion(id=self.id, created=self.created, model=self.model, choices=[], usage=usage)

    def whole(self, text: str, last: Output, *, kv_transfer_params: dict[str, Any] | None) -> BaseModel:
        choice = CompletionChoice(text=text, finish_reason=last.finish_reason)
        return Completion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage(last),
            kv_transfer_params=kv_transfer_params,
        )


class ChatShape(AnswerShape):
    prefix = "chatcmpl"

    def chunk(self, text: str, reason: FinishReason | None) -> BaseModel:
        delta = ChatDelta(content=text if reason is None or text else None)
        choice = ChatChunkChoice(delta=delta, finish_reason=reason)
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def usage_chunk(self, usage: Usage) -> BaseModel:
        return ChatCompletionChunk(
            id=self.id, created=self.created, model=self.model, choices=[], usage=usage
        )

    def opening(self) -> BaseModel | None:
        """The first chunk names the assistant's role, as OpenAI's does."""
        choice = ChatChunkChoice(delta=ChatDelta(role="assistant", content=""))
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[choice])

    def whole(self, text: str, last: Output, *, kv_transfer_params: dict[str, Any] | None) -> BaseModel:
        choice = ChatChoice(message=AssistantMessage(content=text), finish_reason=last.finish_reason)
        return ChatCompletion(
            id=self.id,
            created=self.created,
            model=self.model,
            choices=[choice],
            usage=usage(last),
            kv_transfer_params=kv_transfer_params,
        )


def sse(events: AsyncIterator[BaseModel]) -> StreamingResponse:
    async def body() -> AsyncIterator[str]:
        async for event in events:
            yield f"data: {json.dumps(event.model_dump(), separators=(',', ':'))}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
