"""The FastAPI application: OpenAI-compatible chat completions (plain and SSE), model list, health, web page."""
from __future__ import annotations

import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.middleware.cors import CORSMiddleware

from mobilevlm.errors import MobileVLMError
from mobilevlm.serve.admission import Admission
from mobilevlm.serve.apierror import ApiError
from mobilevlm.serve.budget import MiB, MemoryBudget
from mobilevlm.serve.images import fetch_image
from mobilevlm.serve.messages import render_messages
from mobilevlm.serve.middleware import ApiKeyMiddleware, HostCheckMiddleware, JsonOnlyMiddleware
from mobilevlm.serve.responses import Reply, complete, internal_error, stream_events
from mobilevlm.serve.schema import parse_chat_request
from mobilevlm.serve.worker import Job, QueueFull, WorkQueue

__all__ = ["MiB", "ServerSettings", "create_app"]
STATIC = Path(__file__).parent / "static"


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
    # The one web origin (scheme://host[:port]) whose pages may call the API from a browser; None: no CORS at all.
    cors_origin: str | None = None
    memory_budget_bytes: int = 1024 * MiB  # request bodies + images being decoded + queued pixel tensors
    budget_wait_s: float = 2.0  # how long a request waits for budget (or a body reader) before its 429
    body_readers: int = 8
    decode_workers: int = 2
    body_timeout_s: float = 30.0


def create_app(pipeline, settings: ServerSettings) -> FastAPI:
    work = WorkQueue(pipeline, settings.max_queue)
    budget = MemoryBudget(settings.memory_budget_bytes, settings.budget_wait_s)
    admission = Admission(pipeline, budget, settings.max_body_bytes, settings.body_readers, settings.decode_workers,
                          settings.body_timeout_s)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        work.start()
        yield
        work.stop()
        admission.close()

    app = FastAPI(title="MobileVLM", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.work, app.state.budget = work, budget
    # Each add_middleware wraps what is there, so the last added runs first: Host, then CORS (a preflight carries
    # no credentials, so it is answered before the key check), then the key, then the JSON-only check.
    app.add_middleware(JsonOnlyMiddleware)
    if settings.api_key:
        app.add_middleware(ApiKeyMiddleware, api_key=settings.api_key)
    if settings.cors_origin:
        app.add_middleware(CORSMiddleware, allow_origins=[settings.cors_origin], allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"], max_age=600)
    if settings.allowed_hosts is not None:
        app.add_middleware(HostCheckMiddleware, allowed=settings.allowed_hosts)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, err: ApiError):
        return err.response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException):
        return ApiError(err.status_code, str(err.detail)).response()

    @app.exception_handler(Exception)
    async def _internal_error(request: Request, err: Exception):
        return internal_error(err, _request_id()).response()

    model_card = {"id": settings.model_name, "object": "model", "created": int(time.time()), "owned_by": "mobilevlm"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": settings.model_name, "queue": work.stats(), "memory": budget.stats()}

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

    fetch = partial(fetch_image, max_bytes=settings.max_image_bytes, max_pixels=settings.max_image_pixels,
                    allow_remote=settings.allow_remote_images, allow_private_hosts=settings.allow_private_image_hosts)

    async def admit(request: Request) -> tuple[Job, Reply, bool, bool]:
        """Reads, checks and prepares one request, up to its job waiting in the queue. Every refusal comes from
        here, before any response has started; the body's memory is given back on the way out."""
        _admit(work.ensure_room)  # a full queue answers before the body is even read
        memory = budget.reservation()
        try:
            chat = parse_chat_request(await admission.read_body(request, memory))
            if chat.model != settings.model_name:
                raise _unknown_model(chat.model, settings.model_name)
            job = _admit(work.reserve, _request_id())
            try:
                rendered = await run_in_threadpool(render_messages, chat.messages, pipeline.conversation(),
                                                   fetch, settings.max_images)
                pixels, pixels_memory = await admission.decode(rendered.images, memory)
                max_tokens = chat.max_completion_tokens or chat.max_tokens or settings.default_max_tokens
                try:  # the checks generation makes, done now so that a bad prompt gets a 400 even when streaming
                    ids, _, tokens = await run_in_threadpool(pipeline.encode, rendered.prompt,
                                                             pixels, max_tokens)
                except MobileVLMError as err:
                    pixels_memory.release()
                    raise ApiError(400, str(err), param="messages") from None
                generation = dict(temperature=chat.temperature or 0.0, top_p=chat.top_p, max_new_tokens=max_tokens,
                                  stop=chat.stop_list or None)
                work.submit(job, rendered.prompt, pixels, generation, chat.seed, pixels_memory)
            except BaseException:
                work.unreserve(job)
                raise
        finally:
            memory.release()
        prompt_tokens = len(ids) + len(pixels) * (pipeline.model.config.num_image_tokens - 1)
        include_usage = bool(chat.stream_options and chat.stream_options.include_usage)
        return job, Reply(pipeline, settings.model_name, prompt_tokens, tokens), chat.stream, include_usage

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # the request's messages (and data: URLs) end with `admit`: from here on the job holds what is needed
        job, reply, stream, include_usage = await admit(request)
        if stream:
            return StreamingResponse(stream_events(work, job, reply, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await complete(work, job, reply, request)

    return app


def _request_id() -> str:
    return uuid.uuid4().hex[:16]


def _admit(call, *args):
    try:
        return call(*args)
    except QueueFull as err:
        raise ApiError(429, str(err), code="queue_full", headers={"Retry-After": "1"}) from None


def _unknown_model(requested: str, served: str) -> ApiError:
    return ApiError(404, f"model {requested!r} does not exist; this server serves {served!r}", param="model",
                    code="model_not_found")
