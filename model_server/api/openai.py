"""OpenAI `/v1/completions` and `/v1/chat/completions` over the engine.

Responses are byte-for-byte what the frontend serves (it forwards bodies and
streams without re-encoding), in the shapes of the official openai-python types.
"""
from __future__ import annotations

from typing import Any, Callable, Iterator

from model_server.api.errors import ApiError
from model_server.api.openai_requests import Prepared, cancel, prepare_chat, prepare_completion, submit
from model_server.api.openai_responses import chat_response, chat_stream, completion_response, completion_stream
from model_server.manager import ServedModel
from model_server.settings import RequestLimits


def handle(served: ServedModel, body: dict[str, Any], *, chat: bool, limits: RequestLimits = RequestLimits(),
           abandoned: Callable[[], bool] | None = None) -> tuple[dict[str, Any] | None, Iterator[bytes] | None]:
    """Runs a completion or chat request: (JSON body, None) or (None, SSE byte stream).
    `abandoned` tells a non-streaming wait that the caller has gone (its slots are freed)."""
    prep = (prepare_chat if chat else prepare_completion)(served, body, limits)
    prep.abandoned = abandoned
    submit(served, prep)
    name = body["model"]
    if prep.stream:
        return None, (chat_stream if chat else completion_stream)(served, prep, name)
    try:
        return (chat_response if chat else completion_response)(served, prep, name), None
    finally:
        cancel(prep)


__all__ = ["handle", "prepare_chat", "prepare_completion", "Prepared", "ApiError"]
