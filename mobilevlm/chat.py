"""`mobilevlm generate` (one shot, streamed) and `mobilevlm chat` (interactive, multi-turn)."""
from __future__ import annotations

import argparse
import sys

CHAT_HELP = """commands: /image PATH  add an image to the next question
          /reset       start a new conversation
          /exit        quit (also Ctrl-D)"""


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint directory (or hub id where there is network)")
    parser.add_argument("--conv-mode", default="v1", help="prompt template (v1, plain, llava_llama_2, llama_2, v0)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    parser.add_argument("--top-p", type=float, default=None)
    parser.add_argument("--num-beams", type=int, default=1)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--dtype", default=None, help="float32 | bfloat16 | float16 (default: fp32 on CPU, fp16 on GPU)")
    parser.add_argument("--device", default=None, help="cpu | cuda (default: cuda when available)")
    parser.add_argument("--quantize", choices=("int8", "int4"), default=None,
                        help="CPU quantization while loading: the language model in this mode, the CLIP tower in int8 (fast path)")


def register(subparsers) -> None:
    generate = subparsers.add_parser("generate", help="answer one prompt about zero or more images, streaming")
    _add_model_arguments(generate)
    generate.add_argument("--image", action="append", default=[], help="image file (repeat for several)")
    generate.add_argument("--prompt", required=True, help="the question; <image> tags are added for you")
    generate.set_defaults(func=run_generate)

    chat = subparsers.add_parser("chat", help="interactive multi-turn chat")
    _add_model_arguments(chat)
    chat.add_argument("--image", action="append", default=[], help="image(s) for the first question")
    chat.set_defaults(func=run_chat)


def _pipeline(args):
    import torch

    from mobilevlm.fast.checkpoint import is_quantized_checkpoint
    from mobilevlm.generation import Pipeline
    from mobilevlm.model.loading import resolve_model_dir

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model_dir = resolve_model_dir(args.model)
    quantized = args.quantize or (device == "cpu" and is_quantized_checkpoint(model_dir))
    if quantized or device.startswith("cuda"):
        # the lean decoder: int8 / int4 kernels on the CPU, a CUDA-graph decode step on a GPU (3x transformers')
        from mobilevlm.fast.pipeline import FastPipeline

        dtype = args.dtype or ("bfloat16" if quantized else None)
        return FastPipeline.from_pretrained(model_dir, device=device, dtype=dtype, quantize=args.quantize,
                                            conv_mode=args.conv_mode)
    return Pipeline.from_pretrained(model_dir, device=device, dtype=args.dtype, conv_mode=args.conv_mode)


def _settings(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, num_beams=args.num_beams,
                max_new_tokens=args.max_new_tokens)


def run_generate(args) -> int:
    from mobilevlm.processing import load_image

    images = [load_image(path) for path in args.image]
    pipe = _pipeline(args)
    prompt = pipe.build_prompt(args.prompt, num_images=len(images))
    for piece in pipe.stream(prompt, images, **_settings(args)) if args.num_beams == 1 else [pipe.generate(prompt, images, **_settings(args))]:
        print(piece, end="", flush=True)
    print()
    return 0


def run_chat(args) -> int:
    from mobilevlm.errors import MobileVLMError
    from mobilevlm.processing import load_image

    pipe = _pipeline(args)
    chat = pipe.chat()
    pending = [load_image(path) for path in args.image]
    print(CHAT_HELP, file=sys.stderr)
    while True:
        try:
            line = input("USER: ").strip()
        except EOFError:
            print()
            return 0
        if not line:
            continue
        if line in ("/exit", "/quit"):
            return 0
        if line == "/reset":
            chat, pending = pipe.chat(), []
            print("(new conversation)", file=sys.stderr)
            continue
        if line.startswith("/image"):
            try:
                pending.append(load_image(line.removeprefix("/image").strip()))
                print(f"(image added; {len(pending)} waiting for the next question)", file=sys.stderr)
            except MobileVLMError as err:
                print(f"error: {err}", file=sys.stderr)
            continue
        print("ASSISTANT: ", end="", flush=True)
        try:
            for piece in chat.ask_stream(line, pending, **_settings(args)):
                print(piece, end="", flush=True)
            pending = []
        except MobileVLMError as err:
            print(f"\nerror: {err}", file=sys.stderr)
        print()
