"""`mobilevlm eval`: the whole model-zoo row, plus the `score` and `generate` sub-verbs.

    mobilevlm eval --model DIR --data-dir benchmark_data --benchmarks gqa,mmbench,mme,pope,sqa,textvqa
    mobilevlm eval score pope --answers answers.jsonl --data-dir benchmark_data
    mobilevlm eval generate pope --model DIR --data-dir benchmark_data --answers a.jsonl --num-chunks 8 --chunk-idx 0
"""
from __future__ import annotations

import argparse
import sys

BENCHMARK_CHOICES = ("gqa", "mmbench", "mme", "pope", "sqa", "textvqa")


def _model_options(parser: argparse.ArgumentParser, required: bool) -> None:
    parser.add_argument("--model", required=required, help="checkpoint directory")
    parser.add_argument("--data-dir", required=required, help="the benchmark_data folder")
    parser.add_argument("--batch-size", type=int, default=1, help="questions per generate call (default 1)")
    parser.add_argument("--limit", type=int, default=None, help="only the first N questions of each benchmark")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: float32 on CPU)")
    parser.add_argument("--conv-mode", default=None, help="conversation template (default v1, as the original)")
    parser.add_argument("--max-new-tokens", type=int, default=None,
                        help="override the original budgets (128, MMBench/ScienceQA 1024); for smoke runs only")


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval", help="run and score GQA, ScienceQA-IMG, TextVQA, POPE, MME, MMBench",
        description="Generate answers and score them like the official scripts; writes the model-zoo row "
                    "(results.md, results.json). Sub-verbs: `score` (an existing answer file), `generate` (one chunk).")
    _model_options(parser, required=False)
    parser.add_argument("--benchmarks", default=",".join(BENCHMARK_CHOICES), help="comma-separated (default: all six)")
    parser.add_argument("--out", default=None, help="output folder (default eval_results/<model name>)")
    parser.add_argument("--num-chunks", type=int, default=1, help="split each benchmark over N processes / GPUs")
    parser.set_defaults(func=run_eval, eval_parser=parser)
    actions = parser.add_subparsers(dest="eval_action", metavar="{score,generate}")

    score = actions.add_parser("score", help="score an answer file; prints one JSON line of metrics")
    score.add_argument("benchmark", choices=BENCHMARK_CHOICES)
    score.add_argument("--answers", required=True, help="answer file (JSON lines)")
    score.add_argument("--data-dir", required=True, help="the benchmark_data folder")
    score.set_defaults(func=run_score)

    generate = actions.add_parser("generate", help="generate one chunk of a benchmark's answer file (resumable)")
    generate.add_argument("benchmark", choices=BENCHMARK_CHOICES)
    _model_options(generate, required=True)
    generate.add_argument("--answers", required=True, help="answer file to write (appended to, resumed)")
    generate.add_argument("--num-chunks", type=int, default=1)
    generate.add_argument("--chunk-idx", type=int, default=0)
    generate.set_defaults(func=run_generate)


def run_score(args: argparse.Namespace) -> int:
    import json

    from mobilevlm.eval.scoring import score_file

    print(json.dumps(score_file(args.benchmark, args.answers, args.data_dir)))
    return 0


def run_generate(args: argparse.Namespace) -> int:
    from mobilevlm.eval.launcher import run_chunk

    if not 0 <= args.chunk_idx < args.num_chunks:
        print(f"mobilevlm eval generate: error: --chunk-idx must be in 0..{args.num_chunks - 1}", file=sys.stderr)
        return 2
    count = run_chunk(args.model, args.benchmark, args.data_dir, args.answers, args.num_chunks, args.chunk_idx,
                      args.batch_size, args.limit, args.device, args.dtype, args.conv_mode, args.max_new_tokens)
    print(f"{args.benchmark}: {count} answer(s) generated into {args.answers}", file=sys.stderr)
    return 0


def run_eval(args: argparse.Namespace) -> int:
    if not args.model or not args.data_dir:
        args.eval_parser.print_usage(sys.stderr)
        print("mobilevlm eval: error: --model and --data-dir are required (or use `eval score`)", file=sys.stderr)
        return 2
    if args.num_chunks < 1 or args.batch_size < 1:
        print("mobilevlm eval: error: --num-chunks and --batch-size must be at least 1", file=sys.stderr)
        return 2
    import json

    from mobilevlm.eval.evaluate import run_evaluation

    result = run_evaluation(args.model, args.data_dir, args.benchmarks, args.out, args.batch_size, args.num_chunks,
                            args.limit, args.device, args.dtype, args.conv_mode, args.max_new_tokens,
                            log=lambda message: print(message, file=sys.stderr))
    from pathlib import Path

    sys.stdout.write(Path(result["files"]["markdown"]).read_text())
    print(json.dumps(result["row"]))
    return 0
