"""benchmarks/speed.py runs end to end on the tiny preset (its numbers mean nothing; the script's plumbing does):
every configuration in its own process, the table with ratios against llama.cpp, the JSON results."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"


def test_speed_benchmark_smoke_on_the_tiny_preset(tmp_path):
    configs = ["fast-bf16", "fast-int8", "fast-int4"]
    if importlib.util.find_spec("llama_cpp") is not None:
        configs += ["llama.cpp-q4_0"]
    done = subprocess.run([sys.executable, str(SCRIPT), "--models", "tiny", "--configs", ",".join(configs),
                           "--reps", "1", "--new", "4", "--threads", "1", "--workdir", str(tmp_path / "work"),
                           "--json", str(tmp_path / "results.json")],
                          capture_output=True, text=True, timeout=600, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())["results"]["tiny"]
    assert set(results) == set(configs)
    for name, row in results.items():
        assert row["decode_tok_s"] > 0 and row["ttft_s"] > 0 and row["peak_rss_mib"] > 0, (name, row)
    for name in ("fast-int8", "fast-int4"):
        assert 0 < results[name]["mean_logit_diff"] < results[name]["max_logit_diff"], results[name]
    table = [line for line in done.stdout.splitlines() if line.startswith("| fast-int4 |")]
    assert len(table) == 1
    if "llama.cpp-q4_0" in configs:
        assert table[0].split("|")[7].strip().endswith("x")  # the decode ratio against Q4_0
