"""The FastAPI application: OpenAI-compatible chat completions (plain and SSE), model list, health, web page."""
from __future__ import annotations

import asyncio
import base64
import binascii
import json
import secrets
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from mobilevlm.errors import MobileVLMError
from mobilevlm.serve.apierror import ApiError
from mobilevlm.serve.images import fetch_image
from mobilevlm.serve.messages import render_messages
from mobilevlm.serve.schema import parse_chat_request
from mobilevlm.serve.worker import Job, QueueFull, WorkQueue

STATIC = Path(__file__).parent / "static"
MiB = 1024 * 1024


@dataclass
class ServerSettings:
    model_name: str
    api_key: str | None = None
    allow_remote_images: bool = False
    allow_private_image_hosts: bool = False
    max_queue: int = 16
    max_body_bytes: int = 32 * MiB
    max_image_bytes: int = 16 * MiB
    max_image_pixels: int = 50_000_000
    max_images: int = 8
    default_max_tokens: int = 512
    # Names the Host header may carry (port aside); None: any. `mobilevlm serve` on a loopback address allows only
    # its loopback names: a web page whose domain an attacker re-points to 127.0.0.1 (DNS rebinding) is then refused.
    allowed_hosts: tuple[str, ...] | None = None


LOOPBACK_HOSTS = ("localhost", "127.0.0.1", "::1")


def host_name(host_header: str) -> str:
    """The name in a Host header, without the port and the brackets of an IPv6 literal, lower-cased."""
    host = host_header.strip().lower()
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if host.count(":") == 1 else host


class HostCheckMiddleware:
    """Refuses requests whose Host header names none of `allowed` (HTTP 400)."""

    def __init__(self, app, allowed: tuple[str, ...]):
        self.app, self.allowed = app, {name.lower() for name in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            host = Headers(scope=scope).get("host", "")
            if host_name(host) not in self.allowed:
                error = ApiError(400, f"Host {host!r} is not a name of this server ({', '.join(sorted(self.allowed))}); "
                                      "start it with --allowed-host NAME to add one", code="invalid_host")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class ApiKeyMiddleware:
    """Every route needs the key: `Authorization: Bearer KEY` (API clients) or HTTP Basic with the key as the
    password, which lets a browser open the web page through its own login prompt and reuse it for the page's
    requests."""

    def __init__(self, app, api_key: str):
        self.app, self.key = app, api_key.encode()

    def _authorized(self, headers: Headers) -> bool:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "basic":
            try:
                credential = base64.b64decode(credential.strip(), validate=True).decode().partition(":")[2]
            except (binascii.Error, UnicodeDecodeError):
                return False
        elif scheme.lower() != "bearer":
            return False
        return secrets.compare_digest(credential.strip().encode(), self.key)

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not self._authorized(Headers(scope=scope)):
            error = ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                             code="invalid_api_key", headers={"WWW-Authenticate": 'Basic realm="mobilevlm"'})
            await error.response()(scope, receive, send)
            return
        await self.app(scope, receive, send)


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise ApiError(413, f"request body is {declared} bytes, the limit is {limit}", code="request_too_large")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise ApiError(413, f"request body exceeds the limit of {limit} bytes", code="request_too_large")
    return bytes(body)


def create_app(pipeline, settings: ServerSettings) -> FastAPI:
    work = WorkQueue(pipeline, settings.max_queue)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        work.start()
        yield
        work.stop()

    app = FastAPI(title="MobileVLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.work = work
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed=settings.allowed_hosts)  # added last: runs first

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return ApiError(err.status_code, str(err.detail)).response()

    model_card = {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "mobilevlm"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queue": work.stats()}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != settings.model_name:
            raise _unknown_model(model_id, settings.model_name)
        return model_card

    @app.get("/", include_in_schema=False)
    async def index():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        chat = parse_chat_request(await _read_body(request, settings.max_body_bytes))
        if chat.model != settings.model_name:
            raise _unknown_model(chat.model, settings.model_name)
        _admit(work.ensure_room)
        fetch = partial(fetch_image, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                        allow_remote=settings.allow_remote_images,
                        allow_private_hosts=settings.allow_private_image_hosts)
        rendered = await run_in_threadpool(render_messages, chat.messages, pipeline.conversation(),
                                           fetch, settings.max_images)
        max_tokens = chat.max_completion_tokens or chat.max_tokens or settings.default_max_tokens
        try:  # the same checks generation makes, done now so that a bad prompt gets a 400 even when streaming
            ids, _, budget = await run_in_threadpool(pipeline.encode, rendered.prompt, rendered.images, max_tokens)
        except MobileVLMError as err:
            raise ApiError(400, str(err), param="messages") from None
        prompt_tokens = len(ids) + len(rendered.images) * (pipeline.model.config.num_image_tokens - 1)
        generation = dict(temperature=chat.temperature or 0.0, top_p=chat.top_p, max_new_tokens=max_tokens,
                          stop=chat.stop_list or None)
        job = _admit(work.submit, rendered.prompt, rendered.images, generation, chat.seed)
        reply = _Reply(pipeline, settings.model_name, prompt_tokens, budget)
        if chat.stream:
            include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
            return StreamingResponse(_sse(work, job, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await _complete(work, job, reply, request)

    return app


def _admit(call, *args):
    try:
        return call(*args)
    except QueueFull as err:
        raise ApiError(429, str(err), code="queue_full", headers={"Retry-After": "1"}) from None


def _unknown_model(requested: str, served: str) -> ApiError:
    return ApiError(404, f"model {requested!r} does not exist; this server serves {served!r}", param="model",
                    code="model_not_found")


def _error_for(err: BaseException) -> ApiError:
    if isinstance(err, MobileVLMError):
        return ApiError(400, str(err))
    return ApiError(500, f"internal error during generation: {type(err).__name__}: {err}")


class _Reply:
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


async def _complete(work: WorkQueue, job: Job, reply: _Reply, request: Request) -> JSONResponse:
    watcher = asyncio.create_task(_watch_disconnect(request, work, job))
    pieces = []
    try:
        while True:
            kind, value = await job.next_event()
            if kind == "piece":
                pieces.append(value)
            elif kind == "error":
                raise _error_for(value)
            elif kind == "cancelled":  # the client has gone; this response is for the log only
                raise ApiError(499, "client closed the request")
            else:
                break
    finally:
        watcher.cancel()
        work.cancel(job)
    return JSONResponse(reply.completion("".join(pieces).strip()))


async def _sse(work: WorkQueue, job: Job, reply: _Reply, include_usage: bool):
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
                yield f"data: {json.dumps(_error_for(value).body())}\n\n"
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
