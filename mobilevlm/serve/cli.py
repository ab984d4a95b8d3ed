"""`mobilevlm serve`: the OpenAI-compatible server and web chat page for one checkpoint."""
from __future__ import annotations

import ipaddress
import os
import sys


def register(subparsers) -> None:
    serve = subparsers.add_parser("serve", help="OpenAI-compatible HTTP server with a web chat page",
                                  description="Serves POST /v1/chat/completions, GET /v1/models, GET /health and a "
                                  "chat page at /. See docs/serving.md.")
    serve.add_argument("--model", required=True, help="checkpoint directory")
    serve.add_argument("--model-name", default=None,
                       help="the model id clients must send (default: the checkpoint directory's name)")
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--api-key", default=os.environ.get("MOBILEVLM_API_KEY"),
                       help="require this key on every route (default: $MOBILEVLM_API_KEY; none = open)")
    serve.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                       help="a name clients may reach the server by (Host header), besides localhost / 127.0.0.1 / ::1 "
                            "on a loopback address; repeatable. Without it a non-loopback server accepts any name")
    serve.add_argument("--allow-remote-images", action="store_true",
                       help="let requests name http(s) image URLs, which the server then downloads (public hosts only)")
    serve.add_argument("--allow-private-image-hosts", action="store_true",
                       help="with --allow-remote-images: also download from loopback / private / link-local addresses")
    serve.add_argument("--max-queue", type=int, default=16,
                       help="requests admitted at once (running + waiting); more get HTTP 429")
    serve.add_argument("--max-body-mb", type=float, default=32, help="largest request body (HTTP 413 beyond)")
    serve.add_argument("--max-image-mb", type=float, default=16, help="largest image file (HTTP 413 beyond)")
    serve.add_argument("--max-image-pixels", type=int, default=50_000_000,
                       help="largest image in pixels, checked before decoding (HTTP 400 beyond)")
    serve.add_argument("--max-images", type=int, default=8, help="most images in one request")
    serve.add_argument("--memory-budget-mb", type=float, default=1024,
                       help="memory for request bodies, images being decoded and queued images together; a request "
                            "that finds it taken waits briefly, then gets HTTP 429 (413 if it could never fit)")
    serve.add_argument("--cors-origin", default=None, metavar="ORIGIN",
                       help="let web pages from this one origin (e.g. https://app.example.org) call the API from a "
                            "browser; without it no cross-origin page can")
    serve.add_argument("--max-tokens", type=int, default=512, help="answer length when a request names none")
    serve.add_argument("--conv-mode", default="v1", help="prompt template (v1, plain, llava_llama_2, llama_2, v0)")
    serve.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    serve.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16")
    serve.add_argument("--fast", action="store_true",
                       help="CPU: decode with the lean decoder (FastPipeline, bf16 by default); see docs/inference.md")
    serve.add_argument("--quantize", choices=("int8", "int4"), default=None,
                       help="CPU: quantize while loading, the language model in this mode and the CLIP tower in int8 (implies --fast)")
    serve.set_defaults(func=run_serve)


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _is_origin(origin: str) -> bool:
    """scheme://host[:port] exactly as a browser's Origin header carries it (the CORS check compares strings)."""
    from urllib.parse import urlsplit

    parts = urlsplit(origin)
    return (parts.scheme in ("http", "https") and bool(parts.netloc) and "@" not in parts.netloc
            and origin == f"{parts.scheme}://{parts.netloc.lower()}")


def _allowed_hosts(bind: str, extra: list[str]) -> tuple[str, ...] | None:
    if _is_loopback(bind):
        from mobilevlm.serve.middleware import LOOPBACK_HOSTS

        return (*LOOPBACK_HOSTS, *extra)
    return tuple(extra) or None


def run_serve(args) -> int:
    from pathlib import Path

    import torch
    import uvicorn

    from mobilevlm.generation import Pipeline
    from mobilevlm.serve.app import MiB, ServerSettings, create_app

    if args.max_queue < 1:
        print("mobilevlm serve: error: --max-queue must be at least 1", file=sys.stderr)
        return 2
    if args.memory_budget_mb <= 0:
        print("mobilevlm serve: error: --memory-budget-mb must be positive", file=sys.stderr)
        return 2
    if args.cors_origin is not None and not _is_origin(args.cors_origin):
        print(f"mobilevlm serve: error: --cors-origin {args.cors_origin!r} is not an origin: give scheme://host[:port], "
              "as a browser sends it (no path, no '*')", file=sys.stderr)
        return 2
    if not _is_loopback(args.host) and not args.api_key:
        print(f"mobilevlm serve: warning: listening on {args.host} without --api-key: anyone who can reach this "
              "address can use the model", file=sys.stderr)
    if args.fast or args.quantize:
        from mobilevlm.fast.pipeline import FastPipeline

        pipeline = FastPipeline.from_pretrained(args.model, dtype=args.dtype or "bfloat16", quantize=args.quantize,
                                                conv_mode=args.conv_mode)
    else:
        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        pipeline = Pipeline.from_pretrained(args.model, device=device, dtype=args.dtype, conv_mode=args.conv_mode)
    settings = ServerSettings(
        model_name=args.model_name or Path(args.model).resolve().name, api_key=args.api_key,
        allow_remote_images=args.allow_remote_images, allow_private_image_hosts=args.allow_private_image_hosts,
        max_queue=args.max_queue,
        max_body_bytes=int(args.max_body_mb * MiB), max_image_bytes=int(args.max_image_mb * MiB),
        max_image_pixels=args.max_image_pixels, max_images=args.max_images, default_max_tokens=args.max_tokens,
        allowed_hosts=_allowed_hosts(args.host, args.allowed_host), cors_origin=args.cors_origin,
        memory_budget_bytes=int(args.memory_budget_mb * MiB))
    print(f"mobilevlm serve: model {settings.model_name!r} at http://{args.host}:{args.port}/ "
          f"(API at /v1, queue limit {args.max_queue})", file=sys.stderr)
    uvicorn.run(create_app(pipeline, settings), host=args.host, port=args.port, log_level="info")
    return 0
