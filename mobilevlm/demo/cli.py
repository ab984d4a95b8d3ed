"""`mobilevlm demo`: the MobileVLM recipe (stage I -> stage II) on the shipped small bases and generated data,
evaluated with the real scorers; `mobilevlm demo bases` rebuilds those bases."""
from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="train and evaluate a tiny MobileVLM on generated data (CPU, minutes)",
        description="Generate shape-and-word images with captions, instructions and six benchmark-format test sets; "
                    "starting from the shipped pre-trained tokenizer, CLIP tower and MobileLLaMA, run stage I and "
                    "stage II; evaluate; answer a few questions about held-out images. "
                    "`mobilevlm demo bases` rebuilds the pre-trained bases.")
    parser.add_argument("--out", default="demo_run", help="output folder (default: demo_run)")
    parser.add_argument("--fast", action="store_true", help="the same training, smaller test sets (the CI variant)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the stage data and of stage I / II (the bases stay)")
    parser.add_argument("--projector", choices=("ldpnetv2", "ldpnet"), default="ldpnetv2",
                        help="ldpnetv2: the MobileVLM V2 recipe (default); ldpnet: the V1 recipe")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="where everything trains and runs (default: cpu)")
    parser.add_argument("--scale", type=float, default=1.0,
                        help="multiply the stage data and steps (e.g. 4 on a GPU); the test sets stay the same")
    parser.add_argument("--bases", default=None, metavar="DIR",
                        help="bases built by `mobilevlm demo bases` (default: the ones shipped in the package)")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train tokenizer, CLIP tower and MobileLLaMA inside the run instead of starting from bases")
    parser.set_defaults(func=run)
    actions = parser.add_subparsers(dest="demo_action", metavar="{bases}")
    build = actions.add_parser(
        "bases", help="build the demo's pre-trained tokenizer, CLIP tower and MobileLLaMA",
        description="Train the tokenizer, the tiny CLIP vision tower and the tiny MobileLLaMA on the generated corpus "
                    "(held-out scenes excluded), probe them and write manifest.json. Deterministic for a given seed, "
                    "machine and thread count.")
    build.add_argument("--out", default="demo_bases", help="output folder (default: demo_bases)")
    build.add_argument("--seed", type=int, default=0, help="seed of the corpus and of the training (shipped: 0)")
    build.add_argument("--fast", action="store_true", help="a seconds-long toy build that proves the path works")
    build.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    build.set_defaults(func=run_bases)


def _log(message: str) -> None:
    print(message, flush=True)


def run(args: argparse.Namespace) -> int:
    import logging
    import sys

    from mobilevlm.demo.pipeline import run_demo
    from mobilevlm.demo.report import format_summary

    logging.getLogger("transformers").setLevel(logging.ERROR)
    summary = run_demo(args.out, seed=args.seed, fast=args.fast, projector=args.projector, log=_log, device=args.device,
                       scale=args.scale, bases_dir=args.bases, from_scratch=args.from_scratch)
    print(format_summary(summary), file=sys.stdout, flush=True)
    return 0


def run_bases(args: argparse.Namespace) -> int:
    import json
    import logging
    from dataclasses import replace

    from mobilevlm.demo.shipped import FAST_SETTINGS, SHIPPED_SETTINGS, build_bases

    logging.getLogger("transformers").setLevel(logging.ERROR)
    settings = replace(FAST_SETTINGS if args.fast else SHIPPED_SETTINGS, seed=args.seed)
    # the output folder is left out: the manifest travels with the files
    command = f"mobilevlm demo bases --seed {args.seed} --device {args.device}{' --fast' if args.fast else ''}"
    manifest = build_bases(args.out, settings, log=_log, device=args.device, command=command)
    print(json.dumps({part: manifest[part]["probes"] for part in ("tower", "language_model")}, indent=2))
    print(f"bases written to {args.out} ({manifest['seconds']:.0f} s); use them with `mobilevlm demo --bases {args.out}`")
    return 0
