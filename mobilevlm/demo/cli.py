"""`mobilevlm demo`: train a tiny MobileVLM from nothing on generated data, evaluate it, show a few answers."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train and evaluate a tiny MobileVLM on generated data (CPU, minutes)",
        description="Generate shape-and-word images with captions, instructions and six benchmark-format test sets; "
                    "pre-train a tokenizer, a CLIP tower and a MobileLLaMA; run stage I and stage II; evaluate; answer "
                    "a few questions about held-out images.")
    parser.add_argument("--out", default="demo_run", help="output folder (default: demo_run)")
    parser.add_argument("--fast", action="store_true", help="the same training, smaller test sets (the CI variant)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data and of every training run")
    parser.add_argument("--projector", choices=("ldpnetv2", "ldpnet"), default="ldpnetv2",
                        help="ldpnetv2: the MobileVLM V2 recipe (default); ldpnet: the V1 recipe")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where everything trains and runs (default: cpu, the demo's 10-minute setting)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the training data and steps (e.g. 4 on a GPU); the test sets stay the same")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from mobilevlm.demo.pipeline import run_demo
    from mobilevlm.demo.report import format_summary

    logging.getLogger("transformers").setLevel(logging.ERROR)

    def log(message: str) -> None:
        print(message, flush=True)

    summary = run_demo(args.out, seed=args.seed, fast=args.fast, projector=args.projector, log=log, device=args.device,
                       scale=args.scale)
    print(format_summary(summary), file=sys.stdout, flush=True)
    return 0
