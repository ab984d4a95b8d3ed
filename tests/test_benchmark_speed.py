"""benchmarks/speed.py runs end to end on the tiny preset (its numbers mean nothing; the script's plumbing does):
every configuration in its own process, llama.cpp in its own environment and the project's, the table with ratios
against llama.cpp and the memory-limit column, the JSON results. Its parts are checked without timing anything: the
roofline arithmetic against hand counts, the bandwidth measurement's shape, the llama.cpp environment, and the AMX
check's fallback (in mobilevlm.fast.native)."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mobilevlm.fast import native

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


@pytest.fixture(scope="module")
def speed():
    spec = importlib.util.spec_from_file_location("benchmark_speed", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_speed_benchmark_smoke_on_the_tiny_preset(tmp_path, speed):
    configs = ["fast-bf16", "fast-int8", "fast-int4"]
    if importlib.util.find_spec("llama_cpp") is not None:
        configs += ["llama.cpp-q4_0"]
    done = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--configs", ",".join(configs),
                           "--reps", "1", "--new", "4", "--threads", "1", "--workdir", str(tmp_path / "work"),
                           "--json", str(tmp_path / "results.json")],
                          capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]["tiny"]
    assert set(results) == set(configs)
    for name, row in results.items():
        assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0 and row["peak_rss_mib"] > 0, (name, row)
    for name in ("fast-int8", "fast-int4"):
        assert 0 < results[name]["mean_logit_diff"] < results[name]["max_logit_diff"], results[name]
    for name, row in results.items():
        assert row["bytes_per_token"] > 0 and row["prompt_len"] == 201, (name, row)
    lines = done.stdout.splitlines()
    for header in ("llama.cpp system info:", "project CPU paths:", "read bandwidth:"):
        assert any(line.startswith(header) for line in lines), header
    table = [line for line in lines if line.startswith("| fast-int4 |")]
    assert len(table) == 1
    assert table[0].split("|")[6].strip().endswith("MB/token)")  # % of the memory limit
    if "llama.cpp-q4_0" in configs:
        assert table[0].split("|")[8].strip().endswith("x")  # the decode ratio against Q4_0
        runs = results["llama.cpp-q4_0"]["by_setting"]
        project = speed.child_env("project", {**os.environ, "OMP_NUM_THREADS": "1"})["OMP_WAIT_POLICY"]
        assert runs["default"]["omp_wait_policy"] is None and runs["project"]["omp_wait_policy"] == project
        for run in runs.values():
            assert run["n_threads"] == [1, 1] and run["eval_loop_decode_tok_s"] > 0, run
        assert any(line.startswith("llama.cpp-q4_0 decode cross-check") for line in lines)


def test_llamacpp_default_environment_drops_every_threading_variable(speed):
    base = {"PATH": "/bin", "HOME": "/h", "OMP_WAIT_POLICY": "PASSIVE", "OMP_NUM_THREADS": "1", "GOMP_SPINCOUNT": "0",
            "KMP_BLOCKTIME": "0", "MOBILEVLM_NATIVE_KERNELS": "0"}
    assert speed.child_env("default", base) == {"PATH": "/bin", "HOME": "/h"}
    assert speed.child_env("project", {"PATH": "/bin"}) == {"PATH": "/bin", "OMP_WAIT_POLICY": "PASSIVE"}
    assert speed.child_env("project", {"OMP_WAIT_POLICY": "ACTIVE"})["OMP_WAIT_POLICY"] == "ACTIVE"  # a user's wins
    assert speed.setting_label("default") == "default"


def test_best_of_takes_each_column_from_the_better_setting(speed):
    def run(vision, prefill, decode, rss):
        return {"vision_s": vision, "prefill_s": 200 / prefill, "prefill_tok_s": prefill, "ttft_s": vision + 200 / prefill,
                "decode_tok_s": decode, "decode_best": decode + 1, "peak_rss_mib": rss, "prompt_len": 200}
    row = speed.best_of({"default": run(5.0, 40.0, 9.8, 100), "project": run(4.0, 50.0, 7.8, 90)})
    assert row["setting"] == {"vision_s": "project", "prefill_tok_s": "project", "ttft_s": "project",
                              "decode_tok_s": "default", "peak_rss_mib": "project"}
    assert (row["vision_s"], row["prefill_s"], row["decode_tok_s"], row["decode_best"]) == (4.0, 4.0, 9.8, 10.8)
    row = speed.best_of({"default": {"error": "boom"}, "project": run(4.0, 50.0, 7.8, 90)})
    assert set(row["setting"].values()) == {"project"}
    assert "error" in speed.best_of({"default": {"error": "a"}, "project": {"error": "b"}})


def _config(root: Path) -> None:
    (root / "bf16").mkdir(parents=True)
    (root / "bf16" / "config.json").write_text(json.dumps(
        {"num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_size": 16}))


def test_bytes_per_token_of_a_tiny_checkpoint_match_a_hand_count(tmp_path, speed):
    _config(tmp_path)
    (tmp_path / "int4").mkdir()
    save_file({"model.embed_tokens.weight": torch.zeros(10, 4, dtype=torch.bfloat16),  # one row: 8 bytes
               "lm_head.qweight": torch.zeros(10, 4, dtype=torch.int8),  # 40
               "lm_head.scales": torch.zeros(10, dtype=torch.bfloat16),  # 20
               "model.layers.0.self_attn.q_proj.qweight": torch.zeros(4, 2, dtype=torch.uint8),  # 8
               "model.layers.0.self_attn.q_proj.scales_and_zeros": torch.zeros(1, 4, 2, dtype=torch.bfloat16),  # 16
               "model.norm.weight": torch.zeros(4, dtype=torch.bfloat16),  # 8
               "model.vision_tower.vision_tower.fc.weight": torch.zeros(4, 4, dtype=torch.bfloat16),  # not read
               "model.mm_projector.fc.weight": torch.zeros(4, 4, dtype=torch.bfloat16)},  # not read
              tmp_path / "int4" / "model.safetensors")
    save_file({"model.embed_tokens.weight": torch.zeros(10, 4, dtype=torch.bfloat16),  # one row: 8 bytes
               "lm_head.weight": torch.zeros(10, 4, dtype=torch.bfloat16),  # 80
               "model.norm.weight": torch.zeros(4, dtype=torch.bfloat16),  # 8
               "model.mm_projector.fc.weight": torch.zeros(4, 4, dtype=torch.bfloat16)},  # not read
              tmp_path / "bf16" / "model.safetensors")
    # KV cache: keys and values x 2 layers x 2 kv heads x head_dim 4 x 5 positions x 2 bytes = 320
    assert speed.kv_bytes_per_token(json.loads((tmp_path / "bf16" / "config.json").read_text()), 5, 2) == 320
    assert speed.bytes_per_token("fast-int4", tmp_path, 5) == 8 + 40 + 20 + 8 + 16 + 8 + 320
    assert speed.bytes_per_token("fast-bf16", tmp_path, 5) == 8 + 80 + 8 + 320
    assert speed.bytes_per_token("hf-fp32", tmp_path, 5) == 2 * (8 + 80 + 8) + 2 * 320  # held in fp32
    # a tied lm_head reads the whole embedding table
    tied = {"model.embed_tokens.weight": (80, 10), "model.norm.weight": (8, 4)}
    assert speed.weight_bytes_per_token(tied, "model.embed_tokens.weight", "lm_head.") == 88


def test_gguf_bytes_per_token_match_a_hand_count(tmp_path, speed):
    import gguf

    _config(tmp_path)
    folder = tmp_path / "gguf-q8_0"
    folder.mkdir()
    writer = gguf.GGUFWriter(folder / "model-q8_0.gguf", "llama")
    writer.add_tensor("token_embd.weight", np.zeros((10, 4), dtype=np.float32))  # one row: 16 bytes
    writer.add_tensor("output.weight", np.zeros((10, 4), dtype=np.float16))  # 80
    writer.add_tensor("blk.0.attn_norm.weight", np.zeros(4, dtype=np.float32))  # 16
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    (folder / "mmproj-f16.gguf").write_bytes(b"")  # the tower's file, never read for decoding
    assert speed.bytes_per_token("llama.cpp-q8_0", tmp_path, 5) == 16 + 80 + 16 + 320  # f16 KV cache


@pytest.mark.parametrize("threads", [1, 2])
def test_read_bandwidth_returns_positive_rates_at_the_given_thread_count(speed, threads):
    before = torch.get_num_threads()
    try:
        result = speed.read_bandwidth(threads, nbytes=1 << 24, repeats=1)
    finally:
        torch.set_num_threads(before)
    assert result["threads"] == threads and result["buffer_bytes"] == 1 << 24
    assert len(result["kernels"]) >= 3 and all(rate > 0 for rate in result["kernels"].values())
    assert result["gb_s"] == max(result["kernels"].values())


@pytest.fixture
def fresh_amx_checks(monkeypatch):
    cached = (native.amx_enabled, native.matrix_isa)  # the real ones: tests replace amx_enabled
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    for check in cached:
        check.cache_clear()
    yield
    for check in cached:
        check.cache_clear()


def test_amx_advertised_but_not_enabled_keeps_onednn_on_avx512(monkeypatch, fresh_amx_checks):
    monkeypatch.setattr(native, "amx_advertised", lambda: True)
    monkeypatch.setattr(native, "amx_enabled", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_avx512_supported", lambda: True)
    assert native.matrix_isa() == "AVX-512"
    assert os.environ["ONEDNN_MAX_CPU_ISA"] == "AVX512_CORE_BF16"


def test_amx_enabled_lets_onednn_choose(monkeypatch, fresh_amx_checks):
    monkeypatch.setattr(native, "amx_advertised", lambda: True)
    monkeypatch.setattr(native, "amx_enabled", lambda: True)
    assert native.matrix_isa() == "AMX"
    assert "ONEDNN_MAX_CPU_ISA" not in os.environ


def test_amx_probe_dying_of_sigill_means_not_enabled(monkeypatch, fresh_amx_checks):
    monkeypatch.setattr(native, "amx_advertised", lambda: True)
    monkeypatch.setattr(native, "_AMX_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGILL)")
    assert native.amx_enabled() is False


def test_amx_probe_agrees_with_amx_enabled_and_spares_the_caller(fresh_amx_checks):
    # the real probe: exit 0 only where the tiles run; elsewhere it exits or dies on its own
    done = subprocess.run([sys.executable, "-c", native._AMX_PROBE], capture_output=True, timeout=60)
    assert (done.returncode == 0) == native.amx_enabled()
