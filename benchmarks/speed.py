"""Inference speed of MobileVLM V2 (random weights, official shapes), side by side.

On the CPU (default): transformers fp32/bf16, this project's fast path (bf16, int8, int4) and llama.cpp (Q8_0,
Q4_0 GGUFs written by `mobilevlm export gguf`). On a GPU (`--device cuda`): transformers and the lean decoder in
fp16 and bf16 (the int8 / int4 kernels are CPU kernels; llama.cpp here is a CPU build).

    python benchmarks/speed.py --models 1.7b,3b --reps 3 --workdir bench-work
    python benchmarks/speed.py --device cuda --models 1.7b,3b --workdir bench-work

Every configuration runs in its own process (peak RSS is that process's, load included), on one image and a
200-position prompt (56 text tokens + 144 image tokens for the V2 projector; llama.cpp gets 200 text tokens:
the same prefill work), then greedy decoding. Times are medians over the repetitions after one warm-up.
TTFT = vision encode (CLIP + projector) + prefill + first token. Quality columns compare each
configuration's logits (teacher-forced on the same input) and greedy tokens with the fp32 model on the same device.
On a GPU, peak memory is also torch's peak GPU allocation. This is a script, not a test: it writes ~10 GB of random
checkpoints per model size into --workdir (a GPU run writes only the bf16 one).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # robust 2-thread timings while other processes run

# "tiny" checks the script itself in seconds (its numbers mean nothing)
PRESETS = {"1.7b": "mobilevlm_v2_1.7b", "3b": "mobilevlm_v2_3b", "tiny": "tiny_v2"}
CONFIGS = {"cpu": ("hf-fp32", "hf-bf16", "fast-bf16", "fast-int8", "fast-int4", "llama.cpp-q8_0", "llama.cpp-q4_0"),
           "cuda": ("hf-fp16", "hf-bf16", "fast-fp16", "fast-bf16")}
SAME_BITS = {"fast-int8": "llama.cpp-q8_0", "fast-int4": "llama.cpp-q4_0"}
PROMPT_TEXT_TOKENS = 56
QUALITY_TOKENS = 16


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _prompt(num_image_tokens: int, vocab: int) -> tuple[list[int], list[int]]:
    """Fixed token ids: ours (text + one -200 placeholder) and llama.cpp's (same number of positions)."""
    import random

    rng = random.Random(0)
    text = [rng.randrange(3, vocab) for _ in range(PROMPT_TEXT_TOKENS)]
    ours = [1] + text[:20] + [-200] + text[20:]
    plain = [1] + [rng.randrange(3, vocab) for _ in range(len(ours) - 2 + num_image_tokens)]
    return ours, plain


def _image():
    from PIL import Image

    return Image.radial_gradient("L").resize((640, 480)).convert("RGB")


# ---------------------------------------------------------------------------------------------- preparation
def _write_tokenizer(model_dir: Path, vocab: int) -> None:
    """A LLaMA-style SentencePiece model padded to the full vocabulary, so the GGUF exporter sees 32000 ids."""
    from sentencepiece import sentencepiece_model_pb2

    from mobilevlm.testing import write_tiny_tokenizer

    write_tiny_tokenizer(model_dir, 512)
    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    for i in range(vocab - len(proto.pieces)):
        piece = proto.pieces.add()
        piece.piece, piece.score, piece.type = f"\u2581pad{i}", -1000.0 - i, piece.NORMAL
    (model_dir / "tokenizer.model").write_bytes(proto.SerializeToString())


def prepare(size: str, workdir: Path, device: str, configs: list[str]) -> None:
    """The bf16 source checkpoint, the fp32 reference outputs, and the quantized / GGUF files `configs` use."""
    import torch

    from mobilevlm.cli import main as cli
    from mobilevlm.config import get_preset
    from mobilevlm.fast.checkpoint import save_quantized
    from mobilevlm.fast.decoder import LeanDecoder
    from mobilevlm.fast.quantize import DEFAULT_GROUP_SIZE, quantize_model
    from mobilevlm.model.loading import load_pretrained_model
    from mobilevlm.model.mobilevlm import MobileLlamaForCausalLM
    from mobilevlm.processing import process_images

    root = workdir / size
    source = root / "bf16"
    if not (source / "model.safetensors.index.json").is_file() and not (source / "model.safetensors").is_file():
        torch.manual_seed(0)
        config = get_preset(PRESETS[size])
        with torch.device(device):  # random initialisation of billions of weights is much faster on a GPU
            model = MobileLlamaForCausalLM._from_config(config, dtype=torch.bfloat16)
        model.save_pretrained(source)
        del model
        _write_tokenizer(source, config.vocab_size)
        size_px = config.vision_config().image_size
        (source / "preprocessor_config.json").write_text(json.dumps({
            "crop_size": {"height": size_px, "width": size_px}, "size": {"shortest_edge": size_px},
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}))
    reference = root / f"reference-{device}.pt"
    if not reference.is_file():
        _, model, processor, _ = load_pretrained_model(source, device=device, dtype="float32")
        ids, _ = _prompt(model.config.num_image_tokens, model.config.vocab_size)
        pixels = process_images([_image()], processor, "pad").to(device)
        decoder = LeanDecoder(model, 512)
        with torch.inference_mode():
            embeds = decoder.embed_prompt(ids, pixels)
            logits = model(inputs_embeds=embeds[None]).logits[0].cpu()
        torch.save({"logits": logits, "greedy": _greedy(decoder, embeds, QUALITY_TOKENS)}, reference)
        del model, decoder
    for mode in ("int8", "int4"):
        if f"fast-{mode}" in configs and not (root / mode / "model.safetensors").is_file():
            _, model, _, _ = load_pretrained_model(source, dtype="bfloat16")
            # the tiny model's 64-wide layers take int4 groups of 32 (the official sizes, the default 128)
            group_size = 32 if size == "tiny" else DEFAULT_GROUP_SIZE
            save_quantized(quantize_model(model, mode, group_size), source, root / mode)
            del model
    for outtype in ("q8_0", "q4_0"):
        if f"llama.cpp-{outtype}" in configs and not list((root / f"gguf-{outtype}").glob("*.gguf")):
            cli(["export", "gguf", "--model", str(source), "--outdir", str(root / f"gguf-{outtype}"), "--outtype", outtype])


def _greedy(decoder, embeds, n: int) -> list[int]:
    logits, out = decoder.prefill(embeds), []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = decoder.step(out[-1])
    return out


# ---------------------------------------------------------------------------------------------- measurement
def _torch_runner(name: str, root: Path, threads: int, device: str):
    """(model, vision(), prefill(embeds) -> logits, step(token) -> logits, prompt embeds, lean decoder or None)."""
    import torch

    torch.set_num_threads(threads)
    from mobilevlm.fast.pipeline import FastPipeline
    from mobilevlm.model.loading import load_pretrained_model
    from mobilevlm.processing import process_images

    family, kind = name.split("-")
    if family == "hf":
        _, model, processor, _ = load_pretrained_model(root / "bf16", device=device, dtype=kind)
        state = {}

        def prefill(embeds):
            out = model(inputs_embeds=embeds[None], use_cache=True, logits_to_keep=1)
            state["cache"] = out.past_key_values
            return out.logits[0, -1].float()

        def step(token):
            out = model(input_ids=torch.tensor([[token]], device=device), cache=state["cache"], use_cache=True)
            state["cache"] = out.past_key_values
            return out.logits[0, -1].float()
        decoder = None
    else:
        quantized = kind.startswith("int")
        pipe = FastPipeline.from_pretrained(root / (kind if quantized else "bf16"), device=device,
                                            dtype="bfloat16" if quantized else kind)
        model, processor, decoder = pipe.model, pipe.image_processor, pipe.decoder
        prefill, step = decoder.prefill, decoder.step
    pixels = process_images([_image()], processor, "pad").to(device, model.dtype)
    ids, _ = _prompt(model.config.num_image_tokens, model.config.vocab_size)
    with torch.inference_mode():
        embeds = model.prepare_inputs_labels_for_multimodal(torch.tensor([ids], device=device), None, None, pixels)[0][0]

    def vision():
        # the fast path's own image step (tower + projector + splice), as FastPipeline runs it
        decoder.embed_prompt(ids, pixels) if decoder is not None else model.encode_images(pixels)
        if device != "cpu":
            torch.cuda.synchronize()  # kernels are queued, not done, when the call returns
    return model, vision, prefill, step, embeds, decoder


def _quality(model, decoder, embeds, reference_file: Path) -> dict:
    import torch

    if not reference_file.is_file():
        return {}
    reference = torch.load(reference_file)
    with torch.inference_mode():
        logits = model(inputs_embeds=embeds[None].to(model.dtype)).logits[0].float().cpu()
    diff = (logits - reference["logits"]).abs()
    result = {"max_logit_diff": diff.max().item(), "mean_logit_diff": diff.mean().item(),
              "top1_agree": (logits.argmax(-1) == reference["logits"].argmax(-1)).float().mean().item()}
    if decoder is not None:
        with torch.inference_mode():
            greedy = _greedy(decoder, embeds, QUALITY_TOKENS)
        result["greedy_agree"] = next((i for i, (a, b) in enumerate(zip(greedy, reference["greedy"])) if a != b), len(greedy))
    return result


def measure_torch(name: str, root: Path, args) -> dict:
    import torch

    model, vision, prefill, step, embeds, decoder = _torch_runner(name, root, args.threads, args.device)
    runs = []
    with torch.inference_mode():
        for rep in range(args.reps + 1):
            t0 = time.perf_counter()
            vision()
            t1 = time.perf_counter()
            token = int(prefill(embeds).argmax())
            t2 = time.perf_counter()
            for _ in range(args.new - 1 if rep else 3):
                token = int(step(token).argmax())
            t3 = time.perf_counter()
            if rep:
                runs.append((t1 - t0, t2 - t1, (args.new - 1) / (t3 - t2)))
    result = _summary(runs, embeds.shape[0])
    if args.device != "cpu":
        result["peak_gpu_mib"] = torch.cuda.max_memory_allocated() / 2**20
    result.update(_quality(model, decoder, embeds, root / f"reference-{args.device}.pt") if name != "hf-fp32" else {})
    return result


def measure_llamacpp(name: str, root: Path, args) -> dict:
    import numpy as np

    import llama_cpp as lib

    from mobilevlm.export.llamacpp_runtime import LlamaCppVLM

    folder = root / f"gguf-{name.split('-')[1]}"
    mmproj = next(folder.glob("mmproj*.gguf"))
    llm_file = next(p for p in folder.glob("*.gguf") if p != mmproj)
    vlm = LlamaCppVLM(llm_file, mmproj, n_ctx=512, n_threads=args.threads)
    ctx = vlm.llm.ctx
    n_vocab = vlm.llm.n_vocab()
    _, plain = _prompt(144, n_vocab)
    image = _image()

    def decode(tokens: list[int]) -> int:
        # llama_batch_get_one asks for the last position's logits only (as our prefill computes); the batch
        # points into `array`, which must stay alive until llama_decode returns
        array = (lib.llama_token * len(tokens))(*tokens)
        if lib.llama_decode(ctx, lib.llama_batch_get_one(array, len(tokens))) != 0:
            raise RuntimeError("llama_decode failed")
        return int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))))

    runs = []
    for rep in range(args.reps + 1):
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        t0 = time.perf_counter()
        vlm.image_embeddings(image)
        t1 = time.perf_counter()
        token = decode(plain)
        t2 = time.perf_counter()
        for _ in range(args.new - 1 if rep else 3):
            token = decode([token])
        t3 = time.perf_counter()
        if rep:
            runs.append((t1 - t0, t2 - t1, (args.new - 1) / (t3 - t2)))
    return _summary(runs, len(plain))


def _summary(runs, prompt_len: int) -> dict:
    vision = statistics.median(r[0] for r in runs)
    prefill = statistics.median(r[1] for r in runs)
    return {"vision_s": vision, "prefill_s": prefill, "prefill_tok_s": prompt_len / prefill,
            "ttft_s": statistics.median(r[0] + r[1] for r in runs), "decode_tok_s": statistics.median(r[2] for r in runs),
            "decode_best": max(r[2] for r in runs), "peak_rss_mib": _peak_rss_mib(), "reps": len(runs),
            "load": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------- driver
def machine(device: str = "cpu") -> str:
    import torch

    from mobilevlm.fast.native import cpu_model_name

    cpu = cpu_model_name()
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    try:
        import llama_cpp

        llama = f"llama-cpp-python {llama_cpp.__version__}"
    except ImportError:
        llama = "llama-cpp-python not installed"
    gpu = f"GPU {torch.cuda.get_device_name()}, " if device != "cpu" else ""
    return (f"{gpu}{cpu}, {os.cpu_count()} CPUs, {mem:.0f} GiB RAM, {platform.system()} {platform.machine()}; "
            f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()}), {llama}")


def print_table(size: str, results: dict, args) -> None:
    where = (f"{args.threads} CPU threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}" if args.device == "cpu"
             else f"on {args.device}")
    print(f"\nMobileVLM V2 {size} ({PRESETS[size]}), random weights; 1 image, {PROMPT_TEXT_TOKENS} text + image tokens "
          f"prefill, {args.new} new tokens, {where}, median of {args.reps}")
    # GPU runs have no llama.cpp columns (llama.cpp is a CPU build here) and a peak-GPU-memory column instead
    gpu = args.device != "cpu"
    columns = ["config", "vision s", "prefill tok/s", "TTFT s", "decode tok/s (best)", "peak RSS MiB"]
    columns += ["peak GPU MiB"] if gpu else ["decode vs llama.cpp", "TTFT vs llama.cpp"]
    columns += ["max/mean logit diff vs fp32", "top-1 agree", "greedy agree"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} |")
            continue
        cells = [name, f"{r['vision_s']:.3f}", f"{r['prefill_tok_s']:.0f}", f"{r['ttft_s']:.3f}",
                 f"{r['decode_tok_s']:.1f} ({r['decode_best']:.1f})", f"{r['peak_rss_mib']:.0f}"]
        if gpu:
            cells.append(f"{r['peak_gpu_mib']:.0f}")
        else:
            other = results.get(SAME_BITS.get(name, ""), {})
            cells.append(f"{r['decode_tok_s'] / other['decode_tok_s']:.2f}x" if "decode_tok_s" in other else "-")
            cells.append(f"{r['ttft_s'] / other['ttft_s']:.2f}x" if "ttft_s" in other else "-")
        cells.append(f"{r['max_logit_diff']:.3f} / {r['mean_logit_diff']:.4f}" if "max_logit_diff" in r else "-")
        cells.append(f"{r['top1_agree']:.3f}" if "top1_agree" in r else "-")
        cells.append(f"{r['greedy_agree']}/{QUALITY_TOKENS}" if "greedy_agree" in r else "-")
        print("| " + " | ".join(cells) + " |")
    sys.stdout.flush()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="1.7b", help="comma-separated: 1.7b, 3b (tiny: a smoke test)")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--configs", default=None, help="comma-separated (default: all of the device's)")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--new", type=int, default=64, help="new tokens per repetition")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("bench-work"))
    parser.add_argument("--json", type=Path, default=None, help="also write all results here")
    parser.add_argument("--_child", nargs=2, metavar=("SIZE", "CONFIG"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._child:
        size, name = args._child
        root = args.workdir / size
        if name == "prepare":
            prepare(size, args.workdir, args.device, args.configs.split(","))
            return 0
        result = measure_llamacpp(name, root, args) if name.startswith("llama.cpp") else measure_torch(name, root, args)
        print("RESULT " + json.dumps(result))
        return 0
    print(f"machine: {machine(args.device)}")
    print(f"load average at start: {os.getloadavg()}")
    everything = {}
    base = [sys.executable, __file__, "--workdir", str(args.workdir), "--reps", str(args.reps), "--new", str(args.new),
            "--threads", str(args.threads), "--device", args.device]
    configs = args.configs or ",".join(CONFIGS[args.device])
    for size in args.models.split(","):
        subprocess.run(base + ["--configs", configs, "--_child", size, "prepare"], check=True)
        results = {}
        for name in configs.split(","):
            done = subprocess.run(base + ["--_child", size, name], capture_output=True, text=True)
            line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
            results[name] = json.loads(line[7:]) if line else {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}
            print(f"{size} {name}: {results[name]}", file=sys.stderr, flush=True)
        everything[size] = results
        print_table(size, results, args)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.device), "results": everything}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
