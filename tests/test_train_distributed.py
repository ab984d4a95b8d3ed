"""2 CPU processes (torchrun, gloo) follow the same loss trajectory as 1 process with the same global batch."""
import json
import os
import subprocess
import sys

import pytest

from mobilevlm.train.synthetic import make_training_setup

pytestmark = pytest.mark.slow


def run(setup, out, nproc, per_device):
    flags = ["--model_name_or_path", str(setup.llm), "--vision_tower", str(setup.clip), "--version", "plain",
             "--mm_projector_type", "ldpnetv2", "--mm_vision_select_layer", "-2", "--mm_projector_lr", "1e-2",
             "--data_path", str(setup.pretrain_data), "--image_folder", str(setup.images), "--output_dir", str(out),
             "--per_device_train_batch_size", str(per_device), "--max_steps", "4", "--learning_rate", "1e-3",
             "--logging_steps", "1", "--report_to", "none", "--use_cpu", "True",
             "--dataloader_num_workers", "0", "--save_strategy", "no", "--seed", "0", "--disable_tqdm", "True"]
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)]
    flags += ["--ddp_backend", "gloo"]
    if nproc == 1:
        launcher, flags = [sys.executable], flags[:-2]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launcher + ["-m", "mobilevlm.train", *flags], env=env, capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = json.loads((out / "trainer_state.json").read_text())
    return [entry["loss"] for entry in state["log_history"] if "loss" in entry]


def test_two_processes_match_one(tmp_path):
    setup = make_training_setup(tmp_path / "data", n_images=16)
    single = run(setup, tmp_path / "one", 1, 4)
    double = run(setup, tmp_path / "two", 2, 2)
    assert len(single) == len(double) == 4
    assert single[0] != single[-1]
    assert double == pytest.approx(single, rel=2e-4, abs=2e-4)
