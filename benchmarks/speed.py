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

Fairness on the CPU: the project's rows run with OMP_WAIT_POLICY=PASSIVE; llama.cpp runs twice, in its own default
environment (every OpenMP / project variable dropped) and with the project's setting, with n_threads and
n_threads_batch both set, and each of its columns takes the better of the two (the cell says which). A plain
llama-cpp-python eval loop (prompt, then one token per call) in the same process cross-checks its decode rate. The
header prints llama.cpp's system info, the project's kernel paths (AMX checked at run time) and the read bandwidth
measured in the same run at the same thread count; "% of memory limit" = bytes read per decoded token (every
language-model weight at its stored size, lm_head included, one embedding row, the KV cache at the prompt length)
x tokens/s / that bandwidth.
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

# the project's own rows run with this (robust 2-thread timings while other processes run; a user's value wins)
PROJECT_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
# variables through which the project, or a user, tunes threading; llama.cpp's "default" run gets none of them so that
# it runs as shipped
TUNING_PREFIXES = ("OMP_", "GOMP_", "KMP_", "MOBILEVLM_")
LLAMACPP_SETTINGS = ("default", "project")
# "tiny" checks the script itself in seconds (its numbers mean nothing)
PRESETS = {"1.7b": "mobilevlm_v2_1.7b", "3b": "mobilevlm_v2_3b", "tiny": "tiny_v2"}
CONFIGS = {"cpu": ("hf-fp32", "hf-bf16", "fast-bf16", "fast-int8", "fast-int4", "llama.cpp-q8_0", "llama.cpp-q4_0"),
           "cuda": ("hf-fp16", "hf-bf16", "fast-fp16", "fast-bf16")}
SAME_BITS = {"fast-int8": "llama.cpp-q8_0", "fast-int4": "llama.cpp-q4_0"}
PROMPT_TEXT_TOKENS = 56
QUALITY_TOKENS = 16


def child_env(setting: str, base: dict | None = None) -> dict:
    """A child's environment: "project" (what the project's rows run in) or "default" (llama.cpp's own: every
    threading variable dropped, so no OMP_WAIT_POLICY leaks in from the project's setting)."""
    base = dict(os.environ if base is None else base)
    if setting == "default":
        return {key: value for key, value in base.items() if not key.startswith(TUNING_PREFIXES)}
    return {**base, **{key: base.get(key, value) for key, value in PROJECT_ENV.items()}}


def setting_label(setting: str) -> str:
    return "default" if setting == "default" else child_env("project")["OMP_WAIT_POLICY"]


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

    llm_file, mmproj = _gguf_files(root, name)
    vlm = LlamaCppVLM(llm_file, mmproj, n_ctx=512, n_threads=args.threads)
    ctx = vlm.llm.ctx
    # LlamaCppVLM leaves n_threads_batch at llama-cpp-python's default (every CPU): the prompt must run on the same
    # thread count as everything else
    lib.llama_set_n_threads(ctx, args.threads, args.threads)
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
    result = _summary(runs, len(plain))
    result["n_threads"] = [lib.llama_n_threads(ctx), lib.llama_n_threads_batch(ctx)]
    result["omp_wait_policy"] = os.environ.get("OMP_WAIT_POLICY")  # None in llama.cpp's own environment
    vlm.close()  # before the cross-check loads the model again
    result["eval_loop_decode_tok_s"] = _eval_loop(llm_file, plain, args)
    return result


def _eval_loop(llm_file: Path, prompt: list[int], args) -> float:
    """Median decode tok/s of a plain llama-cpp-python loop (`Llama.eval` on the prompt, then one token per call):
    the cross-check of measure_llamacpp's own batches, in the same environment."""
    import numpy as np

    import llama_cpp as lib

    llm = lib.Llama(model_path=str(llm_file), n_ctx=512, n_batch=512, n_threads=args.threads,
                    n_threads_batch=args.threads, verbose=False)
    n_vocab = llm.n_vocab()

    def next_token() -> int:
        return int(np.argmax(np.ctypeslib.as_array(lib.llama_get_logits(llm.ctx), shape=(n_vocab,))))

    rates = []
    for rep in range(args.reps + 1):
        llm.reset()
        llm.eval(prompt)
        token = next_token()
        t0 = time.perf_counter()
        for _ in range(args.new - 1 if rep else 3):
            llm.eval([token])
            token = next_token()
        if rep:
            rates.append((args.new - 1) / (time.perf_counter() - t0))
    llm.close()
    return statistics.median(rates)


def _summary(runs, prompt_len: int) -> dict:
    vision = statistics.median(r[0] for r in runs)
    prefill = statistics.median(r[1] for r in runs)
    return {"vision_s": vision, "prefill_s": prefill, "prefill_tok_s": prompt_len / prefill,
            "ttft_s": statistics.median(r[0] + r[1] for r in runs), "decode_tok_s": statistics.median(r[2] for r in runs),
            "decode_best": max(r[2] for r in runs), "peak_rss_mib": _peak_rss_mib(), "reps": len(runs),
            "prompt_len": prompt_len, "load": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------- roofline
VISION_PREFIXES = ("model.vision_tower.", "model.mm_projector.")  # not read while decoding
BETTER = {"vision_s": min, "prefill_tok_s": max, "ttft_s": min, "decode_tok_s": max, "peak_rss_mib": min}


def read_bandwidth(threads: int, nbytes: int = 1 << 30, repeats: int = 3) -> dict:
    """The machine's read bandwidth at `threads` torch threads: the best of a few read kernels, each over a buffer
    far larger than the caches (GB/s = bytes read / the kernel's best time after a warm-up pass)."""
    import torch

    torch.set_num_threads(threads)
    data = torch.ones(nbytes // 4)  # written once, so that every page is resident before any timing
    half = data.numel() // 2
    # a copy also writes, so it is credited with its read bytes only (a lower bound)
    kernels = {"torch fp32 sum": (data.sum, nbytes), "torch fp32 max": (data.amax, nbytes),
               "numpy fp32 sum (1 thread)": (data.numpy().sum, nbytes),
               "torch copy (read bytes)": (lambda: data[half:2 * half].copy_(data[:half]), half * 4)}
    rates = {}
    for name, (kernel, read) in kernels.items():
        times = []
        for _ in range(repeats + 1):
            t0 = time.perf_counter()
            kernel()
            times.append(time.perf_counter() - t0)
        rates[name] = read / min(times[1:]) / 1e9
    return {"gb_s": max(rates.values()), "threads": torch.get_num_threads(), "buffer_bytes": nbytes, "kernels": rates}


def safetensors_tensors(folder: Path) -> dict[str, tuple[int, int]]:
    """{name: (stored bytes, rows)} of every tensor in the folder's safetensors files, from their headers."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb") as f:
            header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
        for name, info in header.items():
            if name != "__metadata__":
                start, end = info["data_offsets"]
                tensors[name] = (end - start, info["shape"][0] if info["shape"] else 1)
    return tensors


def gguf_tensors(file: Path) -> dict[str, tuple[int, int]]:
    """{name: (stored bytes, rows)} of a GGUF file's tensors (GGUF lists dimensions innermost first)."""
    from gguf import GGUFReader

    return {t.name: (int(t.n_bytes), int(t.shape[-1])) for t in GGUFReader(file).tensors}


def weight_bytes_per_token(tensors: dict[str, tuple[int, int]], embedding: str, head_prefix: str,
                           skip: tuple[str, ...] = ()) -> int:
    """Bytes of weights one decode step reads: every tensor at its stored size except the token embedding table, of
    which one row is read (all of it where the lm_head is tied to it); names starting with `skip` are left out."""
    tied = not any(name.startswith(head_prefix) for name in tensors)
    total = 0
    for name, (nbytes, rows) in tensors.items():
        if not name.startswith(skip):
            total += nbytes // rows if name == embedding and not tied else nbytes
    return total


def kv_bytes_per_token(config: dict, positions: int, element_bytes: int) -> int:
    """Bytes of KV cache one decode step reads with `positions` positions cached (keys and values, every layer)."""
    heads = config["num_attention_heads"]
    head_dim = config.get("head_dim") or config["hidden_size"] // heads
    kv_heads = config.get("num_key_value_heads") or heads
    return 2 * config["num_hidden_layers"] * kv_heads * head_dim * positions * element_bytes


def _gguf_files(root: Path, name: str) -> tuple[Path, Path]:
    """(language model, mmproj) of a llama.cpp config."""
    folder = root / f"gguf-{name.split('-')[1]}"
    mmproj = next(folder.glob("mmproj*.gguf"))
    return next(p for p in folder.glob("*.gguf") if p != mmproj), mmproj


def bytes_per_token(name: str, root: Path, positions: int) -> int:
    """What one decode step of configuration `name` reads at a prompt of `positions` (weights + KV cache)."""
    config = json.loads((root / "bf16" / "config.json").read_text())
    family, kind = name.split("-")
    if family == "llama.cpp":  # its KV cache is f16 by default
        weights = weight_bytes_per_token(gguf_tensors(_gguf_files(root, name)[0]), "token_embd.weight", "output.weight")
        return weights + kv_bytes_per_token(config, positions, 2)
    quantized = kind.startswith("int")
    weights = weight_bytes_per_token(safetensors_tensors(root / (kind if quantized else "bf16")),
                                     "model.embed_tokens.weight", "lm_head.", VISION_PREFIXES)
    # unquantized runs hold the bf16 checkpoint at their own dtype; the lean decoder's KV cache is bf16
    element = 4 if kind == "fp32" else 2
    return weights * (1 if quantized else element // 2) + kv_bytes_per_token(config, positions, element)


def vision_precision(name: str, root: Path) -> str:
    """The precision the configuration's CLIP tower runs at (the mmproj's matrices for llama.cpp)."""
    family, kind = name.split("-")
    if family == "llama.cpp":
        from gguf import GGUFReader

        tensors = GGUFReader(_gguf_files(root, name)[1]).tensors
        return next(t.tensor_type.name for t in tensors if t.name.endswith("attn_q.weight")).lower()
    if kind.startswith("int"):
        quantization = json.loads((root / kind / "config.json").read_text()).get("quantization", {})
        return quantization.get("vision_mode", kind) if quantization.get("include_vision", True) else "bf16"
    return kind


def best_of(by_setting: dict[str, dict]) -> dict:
    """One llama.cpp row from its runs in each setting: each column's better number, and which setting gave it."""
    ok = {setting: r for setting, r in by_setting.items() if "error" not in r}
    if not ok:
        return {"error": "; ".join(f"{setting_label(s)}: {r['error']}" for s, r in by_setting.items()),
                "by_setting": by_setting}
    row = {"by_setting": by_setting, "setting": {}}
    for column, better in BETTER.items():
        setting = better(ok, key=lambda s: ok[s][column])
        row[column], row["setting"][column] = ok[setting][column], setting
    row["prefill_s"] = ok[row["setting"]["prefill_tok_s"]]["prefill_s"]
    row["decode_best"] = ok[row["setting"]["decode_tok_s"]]["decode_best"]
    row["prompt_len"] = next(iter(ok.values()))["prompt_len"]
    return row


def _onednn_isa() -> str:
    """The implementation and ISA oneDNN reports for a bf16 matrix product in this process (what its kernels run)."""
    import ctypes
    import tempfile

    import torch

    sys.stdout.flush()
    saved = os.dup(1)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 1)  # oneDNN's verbose lines go to the C library's stdout
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                a = torch.ones(64, 64, dtype=torch.bfloat16)
                a @ a
        finally:
            ctypes.CDLL(None).fflush(None)
            os.dup2(saved, 1)
            os.close(saved)
        log.seek(0)
        lines = log.read().decode(errors="replace").splitlines()
    isa = next((line.split("isa:", 1)[1] for line in lines if ",isa:" in line), "?")
    kernel = next((line.split(",")[6] for line in lines if ",primitive,exec," in line), "no oneDNN primitive ran")
    return f"{kernel} ({isa})"


def probe(args) -> dict:
    """The project's CPU paths in this environment and, on the CPU, the read bandwidth at the run's thread count."""
    from mobilevlm.fast import int4_kernels, native

    isa = native.matrix_isa()  # before any matrix product: caps oneDNN where AMX is advertised but forbidden
    if native.available():
        kernels = "native AVX-512 VNNI (int4 and int8 products, decode attention)"
    else:
        why = "MOBILEVLM_NATIVE_KERNELS=0" if os.environ.get(native.SWITCH) == "0" else native.build()
        kernels = f"torch's (aten int4, fbgemm int8, SDPA): {why}"
    amx = f"cpuid {'yes' if native.amx_advertised() else 'no'}, runs {'yes' if native.amx_enabled() else 'no'}"
    paths = {"kernels": kernels, "int4 kernel": int4_kernels.selected().__name__, "AMX": amx,
             "oneDNN may use": isa, "oneDNN ran": _onednn_isa()}
    return {"paths": paths, "bandwidth": read_bandwidth(args.threads) if args.device == "cpu" else None}


def _child_result(done: subprocess.CompletedProcess) -> dict:
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    return json.loads(line[7:]) if line else {"error": (done.stderr.strip().splitlines() or ["?"])[-1][:200]}


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


def _llama_system_info() -> str:
    try:
        import llama_cpp
    except ImportError:
        return "llama-cpp-python not installed"
    return llama_cpp.llama_print_system_info().decode().strip()


def print_table(size: str, results: dict, args, probed: dict) -> None:
    where = (f"{args.threads} CPU threads, OMP_WAIT_POLICY={child_env('project')['OMP_WAIT_POLICY']} for the project"
             if args.device == "cpu" else f"on {args.device}")
    print(f"\nMobileVLM V2 {size} ({PRESETS[size]}), random weights; 1 image, {PROMPT_TEXT_TOKENS} text + image tokens "
          f"prefill, {args.new} new tokens, {where}, median of {args.reps}")
    # GPU runs have no llama.cpp or roofline columns (llama.cpp is a CPU build here, the bandwidth the CPU's) and a
    # peak-GPU-memory column instead
    gpu = args.device != "cpu"
    if not gpu:
        print(f"llama.cpp cells say which environment gave the number: (default) = llama.cpp's own, "
              f"({setting_label('project')}) = the project's; % of memory limit = bytes per token x tok/s / "
              f"{probed['bandwidth']['gb_s']:.1f} GB/s")
    columns = ["config", "vision s (precision)", "prefill tok/s", "TTFT s", "decode tok/s (best)"]
    columns += ["peak RSS MiB", "peak GPU MiB"] if gpu else ["% of memory limit", "peak RSS MiB", "decode vs llama.cpp",
                                                            "TTFT vs llama.cpp"]
    columns += ["max/mean logit diff vs fp32", "top-1 agree", "greedy agree"]
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for name, r in results.items():
        if "error" in r:
            print(f"| {name} | error: {r['error']} |")
            continue

        def which(column: str) -> str:
            return f" ({setting_label(r['setting'][column])})" if "setting" in r else ""
        cells = [name, f"{r['vision_s']:.3f} {r['vision_precision']}{which('vision_s')}",
                 f"{r['prefill_tok_s']:.0f}{which('prefill_tok_s')}", f"{r['ttft_s']:.3f}{which('ttft_s')}",
                 f"{r['decode_tok_s']:.1f} ({r['decode_best']:.1f}){which('decode_tok_s')}"]
        if gpu:
            cells += [f"{r['peak_rss_mib']:.0f}", f"{r['peak_gpu_mib']:.0f}"]
        else:
            limit = r["bytes_per_token"] * r["decode_tok_s"] / (probed["bandwidth"]["gb_s"] * 1e9)
            cells += [f"{100 * limit:.0f} % ({r['bytes_per_token'] / 1e6:.1f} MB/token)",
                      f"{r['peak_rss_mib']:.0f}{which('peak_rss_mib')}"]
            other = results.get(SAME_BITS.get(name, ""), {})
            cells.append(f"{r['decode_tok_s'] / other['decode_tok_s']:.2f}x" if "decode_tok_s" in other else "-")
            cells.append(f"{r['ttft_s'] / other['ttft_s']:.2f}x" if "ttft_s" in other else "-")
        cells.append(f"{r['max_logit_diff']:.3f} / {r['mean_logit_diff']:.4f}" if "max_logit_diff" in r else "-")
        cells.append(f"{r['top1_agree']:.3f}" if "top1_agree" in r else "-")
        cells.append(f"{r['greedy_agree']}/{QUALITY_TOKENS}" if "greedy_agree" in r else "-")
        print("| " + " | ".join(cells) + " |")
    llama = {name: r for name, r in results.items() if name.startswith("llama.cpp") and "error" not in r}
    if "vision_s" in results.get("fast-bf16", {}) and llama:
        name = min(llama, key=lambda n: llama[n]["vision_s"])
        ours, theirs = results["fast-bf16"], llama[name]
        print(f"vision at 16 bits: fast-bf16 {ours['vision_s']:.3f} s ({ours['vision_precision']}) vs {name} "
              f"{theirs['vision_s']:.3f} s ({theirs['vision_precision']} mmproj): "
              f"{ours['vision_s'] / theirs['vision_s']:.2f}x")
    for name, r in llama.items():
        checks = []
        for setting, run in r["by_setting"].items():
            if "eval_loop_decode_tok_s" in run:
                off = run["decode_tok_s"] / run["eval_loop_decode_tok_s"] - 1
                checks.append(f"{setting_label(setting)}: script {run['decode_tok_s']:.1f}, loop "
                              f"{run['eval_loop_decode_tok_s']:.1f} tok/s ({100 * off:+.0f} %"
                              f"{', more than 10 % apart' if abs(off) > 0.1 else ''}); "
                              f"n_threads / n_threads_batch {run['n_threads'][0]} / {run['n_threads'][1]}")
        print(f"{name} decode cross-check (plain llama-cpp-python eval loop): " + "; ".join(checks))
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
        if name == "probe":
            result = probe(args)
        elif name.startswith("llama.cpp"):
            result = measure_llamacpp(name, root, args)
        else:
            result = measure_torch(name, root, args)
        print("RESULT " + json.dumps(result))
        return 0
    project = child_env("project")
    print(f"machine: {machine(args.device)}")
    print(f"llama.cpp system info: {_llama_system_info()}")
    print(f"load average at start: {os.getloadavg()}")
    base = [sys.executable, __file__, "--workdir", str(args.workdir), "--reps", str(args.reps), "--new", str(args.new),
            "--threads", str(args.threads), "--device", args.device]
    probed = _child_result(subprocess.run(base + ["--_child", "-", "probe"], capture_output=True, text=True,
                                          env=project))
    if "error" in probed:
        raise SystemExit(f"probing the CPU paths failed: {probed['error']}")
    print("project CPU paths: " + "; ".join(f"{key}: {value}" for key, value in probed["paths"].items()))
    if probed["bandwidth"]:
        bandwidth = probed["bandwidth"]
        print(f"read bandwidth: {bandwidth['gb_s']:.1f} GB/s with {bandwidth['threads']} thread(s), best of "
              + ", ".join(f"{k} {v:.1f}" for k, v in bandwidth["kernels"].items())
              + f" (buffer {bandwidth['buffer_bytes'] / 2**30:.2g} GiB)")
    everything = {}
    configs = args.configs or ",".join(CONFIGS[args.device])
    for size in args.models.split(","):
        root = args.workdir / size
        subprocess.run(base + ["--configs", configs, "--_child", size, "prepare"], check=True, env=project)
        results = {}
        for name in configs.split(","):
            if name.startswith("llama.cpp"):
                results[name] = best_of({setting: _child_result(subprocess.run(
                    base + ["--_child", size, name], capture_output=True, text=True, env=child_env(setting)))
                    for setting in LLAMACPP_SETTINGS})
            else:
                results[name] = _child_result(subprocess.run(base + ["--_child", size, name], capture_output=True,
                                                              text=True, env=project))
            if "error" not in results[name]:
                results[name]["vision_precision"] = vision_precision(name, root)
                results[name]["bytes_per_token"] = bytes_per_token(name, root, results[name]["prompt_len"])
            print(f"{size} {name}: {results[name]}", file=sys.stderr, flush=True)
        everything[size] = results
        print_table(size, results, args, probed)
    if args.json:
        args.json.write_text(json.dumps({"machine": machine(args.device), "llama_system_info": _llama_system_info(),
                                         "probe": probed, "results": everything}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
