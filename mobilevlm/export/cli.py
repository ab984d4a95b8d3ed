"""`mobilevlm export gguf`: the command-line face of mobilevlm.export (argparse only at import time)."""
from __future__ import annotations

import argparse

OUTTYPE_CHOICES = ("f32", "f16", "q8_0", "q4_0")


def register(subparsers) -> None:
    export = subparsers.add_parser("export", help="export a checkpoint for other runtimes")
    formats = export.add_subparsers(dest="format", metavar="<format>", required=True)
    gguf = formats.add_parser(
        "gguf",
        help="llama.cpp files: the language model GGUF and, for MobileVLM, the mmproj GGUF",
        description="Write the llama.cpp GGUF files of a MobileVLM or MobileLLaMA checkpoint directory. "
        "Run them with: llama-mtmd-cli -m <model>.gguf --mmproj <mmproj>.gguf --jinja --image IMG "
        "-p '<__media__>\\nQUESTION' --temp 0",
    )
    gguf.add_argument("--model", required=True, help="checkpoint directory (config.json, weights, tokenizer.model)")
    gguf.add_argument("--outdir", required=True, help="directory for the .gguf files (created if missing)")
    gguf.add_argument("--outtype", choices=OUTTYPE_CHOICES, default="f16",
                      help="language-model weight type (default f16); the mmproj stays f16 (f32 with --outtype f32)")
    gguf.add_argument("--literal-cls", action="store_true",
                      help="keep CLIP's class token in the mmproj as it is; by default it is left out because "
                      "llama.cpp places it after the patches, which costs more (see docs/export.md)")
    gguf.set_defaults(func=run_export_gguf)


def run_export_gguf(args: argparse.Namespace) -> int:
    from mobilevlm.export.gguf_export import export_gguf

    result = export_gguf(args.model, args.outdir, args.outtype, literal_cls=args.literal_cls)
    print(f"language model: {result.language_model}")
    if result.mmproj is not None:
        print(f"mmproj:         {result.mmproj}")
    return 0
