"""The response side of a chat completion: the OpenAI response objects, a plain answer, the SSE stream."""
from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid

from fastapi import Request
from fastapi.responses import JSONResponse

from mobilevlm.errors import MobileVLMError
from mobilevlm.serve.apierror import ApiError
from mobilevlm.serve.worker import Job, WorkQueue

log = logging.getLogger("mobilevlm.serve")


def internal_error(err: BaseException, request_id: str, logged: bool = False) -> ApiError:
    """A 500 that names the request id and nothing of the failure: the detail is for the server log only."""
    if not logged:
        log.error("internal error (request id %s)", request_id, exc_info=err)
    return ApiError(500, f"internal error (request id {request_id}; the server log has the detail)",
                    code="internal_error")


def error_for(err: BaseException, job: Job) -> ApiError:
    if isinstance(err, MobileVLMError):
        return ApiError(400, str(err))
    return internal_error(err, job.request_id, logged=True)  # the worker logged it with the traceback


class Reply:
    """Builds the OpenAI response objects for one completion."""

    def __init__(self, pipeline, model_name: str, prompt_tokens: int, budget: int):
        self.pipeline, self.model, self.prompt_tokens, self.budget = pipeline, model_name, prompt_tokens, budget
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

    def usage_and_finish(self, text: str) -> tuple[dict, str]:
        # The pipeline returns text, not token ids: the count is of the answer re-tokenized (capped by the
        # budget, which re-tokenizing can overshoot), and an answer that used the whole budget was cut by it.
        completion = len(self.pipeline.tokenizer(text, add_special_tokens=False)["input_ids"]) if text else 0
        completion = min(completion, self.budget)
        usage = {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion,
                 "total_tokens": self.prompt_tokens + completion}
        return usage, "length" if completion >= self.budget else "stop"

    def completion(self, text: str) -> dict:
        usage, finish = self.usage_and_finish(text)
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None,
                             "finish_reason": finish}], "usage": usage}

    def chunk(self, delta: dict, finish: str | None = None, usage: dict | None = None, choices: bool = True) -> str:
        body = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}] if choices else []}
        if usage is not None:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"


async def _watch_disconnect(request: Request, work: WorkQueue, job: Job) -> None:
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)
    work.cancel(job)


async def complete(work: WorkQueue, job: Job, reply: Reply, request: Request) -> JSONResponse:
    watcher = asyncio.create_task(_watch_disconnect(request, work, job))
    pieces = []
    try:
        while True:
            kind, value = await job.next_event()
            if kind == "piece":
                pieces.append(value)
            elif kind == "error":
                raise error_for(value, job)
            elif kind == "cancelled":  # the client has gone; this response is for the log only
                raise ApiError(499, "client closed the request")
            else:
                break
    finally:
        watcher.cancel()
        work.cancel(job)
    return JSONResponse(reply.completion("".join(pieces).strip()))


async def stream_events(work: WorkQueue, job: Job, reply: Reply, include_usage: bool):
    """OpenAI's chunk stream; the generator is cancelled when the client disconnects, which cancels the job."""
    pieces = []
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            kind, value = await job.next_event()
            if kind == "piece":
                pieces.append(value)
                yield reply.chunk({"content": value})
            elif kind == "error":
                yield f"data: {json.dumps(error_for(value, job).body())}\n\n"
                break
            elif kind == "cancelled":
                return
            else:
                usage, finish = reply.usage_and_finish("".join(pieces))
                yield reply.chunk({}, finish)
                if include_usage:
                    yield reply.chunk({}, usage=usage, choices=False)
                break
        yield "data: [DONE]\n\n"
    finally:
        work.cancel(job)
