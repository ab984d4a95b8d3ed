"""`mobilevlm quantize`: write an int8 / int4 copy of a checkpoint for fast CPU inference."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser("quantize", help="write an int8/int4 quantized checkpoint (CPU)")
    parser.add_argument("--model", required=True, help="full-precision checkpoint directory")
    parser.add_argument("--out", required=True, help="output directory (load it with --model like any checkpoint)")
    parser.add_argument("--mode", required=True, choices=("int8", "int4"))
    parser.add_argument("--group-size", type=int, default=128, help="int4 group size (input channels per scale)")
    parser.add_argument("--vision-bf16", action="store_true",
                        help="keep the CLIP tower and projector in bf16 (default: int8, which is smaller and faster)")
    parser.add_argument("--report", action="store_true",
                        help="print logit differences and greedy agreement against full precision")
    parser.set_defaults(func=run_quantize)


def run_quantize(args: argparse.Namespace) -> int:
    import json

    from mobilevlm.fast.checkpoint import save_quantized
    from mobilevlm.fast.quantize import quantize_model
    from mobilevlm.model.loading import load_pretrained_model

    # --report compares against the checkpoint in fp32, so it is loaded in fp32 and quantized from a copy
    tokenizer, model, _, _ = load_pretrained_model(args.model, device="cpu", dtype="float32" if args.report else "bfloat16")
    reference = None
    if args.report:
        import copy

        reference, model = model, copy.deepcopy(model)
    quantize_model(model, args.mode, args.group_size, include_vision=not args.vision_bf16)
    out = save_quantized(model, args.model, args.out)
    print(f"wrote {args.mode} checkpoint to {out}")
    if reference is not None:
        from mobilevlm.fast.quality import logit_report

        ids = tokenizer("A chat between a curious user and an artificial intelligence assistant. USER: "
                        "Describe the image in detail. ASSISTANT:").input_ids
        print(json.dumps(logit_report(reference, model, ids), indent=2))
    return 0
