"""Offline quantized checkpoints: `mobilevlm quantize` writes one, it loads back to the same model."""
import copy
import json

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from mobilevlm.cli import main
from mobilevlm.config import TINY_VISION_TOWER
from mobilevlm.errors import CheckpointError
from mobilevlm.fast.checkpoint import load_quantized, save_quantized
from mobilevlm.fast.pipeline import FastPipeline
from mobilevlm.fast.quantize import Int4Linear, Int8Linear, quantizable_linears, quantize_model
from mobilevlm.generation import GenerationSettings
from mobilevlm.model.loading import load_pretrained_model
from mobilevlm.testing import make_tiny_checkpoint


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("src") / "tiny", "tiny_v2", seed=7)


@pytest.mark.parametrize("mode,kind", [("int8", Int8Linear), ("int4", Int4Linear)])
def test_quantized_checkpoint_round_trips(source, tmp_path, mode, kind):
    _, model, _, _ = load_pretrained_model(source, dtype="bfloat16")
    quantize_model(model, mode, group_size=32)
    out = save_quantized(model, source, tmp_path / mode)
    assert json.loads((out / "config.json").read_text())["quantization"]["mode"] == mode
    assert (out / "tokenizer.model").is_file() and (out / "preprocessor_config.json").is_file()
    _, loaded, processor, _ = load_quantized(out)
    assert processor is not None
    assert isinstance(loaded.model.layers[1].mlp.down_proj, kind)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys()
    assert all(torch.equal(original[k], reloaded[k]) for k in original)
    ids = torch.tensor([[1, 5, 9, -200, 30, 31]])
    pixels = torch.randn(1, 3, 96, 96, dtype=torch.bfloat16)
    with torch.inference_mode():
        torch.testing.assert_close(loaded(input_ids=ids, images=pixels).logits, model(input_ids=ids, images=pixels).logits,
                                   atol=0, rtol=0)


def _mapped_files(address: int) -> set[str]:
    """Files mapped at `address` in this process (from /proc/self/maps)."""
    files = set()
    for line in open("/proc/self/maps"):
        fields = line.split()
        begin, end = (int(part, 16) for part in fields[0].split("-"))
        if begin <= address < end and len(fields) >= 6:
            files.add(fields[5])
    return files


@pytest.mark.skipif(not __import__("os").path.exists("/proc/self/maps"), reason="needs /proc (Linux)")
def test_token_embeddings_stay_mapped_from_the_file(source, tmp_path):
    _, model, _, _ = load_pretrained_model(source, dtype="bfloat16")
    out = save_quantized(quantize_model(model, "int4", group_size=32), source, tmp_path / "q")
    _, loaded, _, _ = load_quantized(out)
    weight = loaded.get_input_embeddings().weight
    assert torch.equal(weight, load_file(out / "model.safetensors")["model.embed_tokens.weight"])
    assert str((out / "model.safetensors").resolve()) in _mapped_files(weight.data_ptr())
    # the mapping is private: using the model never writes to the checkpoint
    before = (out / "model.safetensors").read_bytes()
    with torch.inference_mode():
        loaded(input_ids=torch.tensor([[1, 5, 9]]))
    assert (out / "model.safetensors").read_bytes() == before


def test_cli_quantize_then_fast_pipeline_matches_load_time_quantization(source, tmp_path):
    assert main(["quantize", "--model", str(source), "--out", str(tmp_path / "q"), "--mode", "int4",
                 "--group-size", "32"]) == 0
    offline = FastPipeline.from_pretrained(tmp_path / "q")
    online = FastPipeline.from_pretrained(source, quantize="int4", group_size=32)
    image = Image.new("RGB", (64, 80), (10, 200, 30))
    prompt = online.build_prompt("What colour is the square?")
    results = []
    for pipe in (offline, online):
        ids, pixels, budget = pipe.encode(prompt, [image], 16)
        results.append(pipe._generate_ids([ids], pixels, GenerationSettings(max_new_tokens=16), budget).tolist())
    assert results[0] == results[1] and len(results[0][0]) == 16


def test_damaged_quantized_checkpoint_is_a_clear_error(source, tmp_path):
    _, model, _, _ = load_pretrained_model(source, dtype="bfloat16")
    out = save_quantized(quantize_model(model, "int8"), source, tmp_path / "q")
    state = load_file(out / "model.safetensors")
    del state["model.layers.0.mlp.up_proj.qweight"]
    save_file(state, out / "model.safetensors")
    with pytest.raises(CheckpointError, match="missing tensors model.layers.0.mlp.up_proj.qweight"):
        load_quantized(out)
    with pytest.raises(CheckpointError, match="not a quantized checkpoint"):
        load_quantized(source)


def test_saving_an_unquantized_model_is_refused(source, tmp_path):
    _, model, _, _ = load_pretrained_model(source)
    with pytest.raises(CheckpointError, match="not quantized"):
        save_quantized(copy.deepcopy(model), source, tmp_path / "x")


def test_cli_report_prints_quality_numbers(source, tmp_path, capsys):
    assert main(["quantize", "--model", str(source), "--out", str(tmp_path / "q8"), "--mode", "int8", "--report"]) == 0
    report = json.loads(capsys.readouterr().out.split("\n", 1)[1])
    assert 0 < report["mean_abs_diff"] < report["max_abs_diff"] and 0 <= report["top1_agreement"] <= 1


def test_quantized_directory_loads_through_the_ordinary_entry_points(source, tmp_path, capsys):
    assert main(["quantize", "--model", str(source), "--out", str(tmp_path / "q8"), "--mode", "int8"]) == 0
    _, model, processor, _ = load_pretrained_model(tmp_path / "q8")
    assert isinstance(model.model.layers[0].self_attn.q_proj, Int8Linear) and processor is not None
    image = tmp_path / "green.png"
    Image.new("RGB", (64, 80), (10, 200, 30)).save(image)
    capsys.readouterr()
    assert main(["generate", "--model", str(tmp_path / "q8"), "--image", str(image), "--prompt", "Colour?",
                 "--max-new-tokens", "6"]) == 0
    expected = FastPipeline.from_pretrained(tmp_path / "q8")
    answer = expected.generate(expected.build_prompt("Colour?"), [image], max_new_tokens=6)
    assert capsys.readouterr().out.strip() == answer
    with pytest.raises(Exception, match="quantized CPU checkpoint"):
        load_pretrained_model(tmp_path / "q8", device="cuda")


def test_int4_checkpoint_with_an_int4_tower_still_loads(tmp_path):
    """Before the tower went int8 in both modes, `--mode int4 --include-vision` stored it in int4, and its config
    had no vision_mode."""
    tower = {**TINY_VISION_TOWER, "hidden_size": 64, "intermediate_size": 128, "projection_dim": 64}  # int4-sized
    source = make_tiny_checkpoint(tmp_path / "src", "tiny_v2", seed=7, mm_vision_tower_config=tower)
    _, model, _, _ = load_pretrained_model(source, dtype="bfloat16")
    quantize_model(model, "int4", group_size=32, include_vision=False)
    for parent, attr, _, linear in list(quantizable_linears(model, include_vision=True)):
        setattr(parent, attr, Int4Linear.from_linear(linear, 32))
    model.config.quantization = {"mode": "int4", "group_size": 32, "include_vision": True}
    out = save_quantized(model, source, tmp_path / "old")
    _, loaded, _, _ = load_quantized(out)
    assert isinstance(loaded.model.vision_tower.vision_tower.vision_model.encoder.layers[0].mlp.fc1, Int4Linear)
    original, reloaded = model.state_dict(), loaded.state_dict()
    assert original.keys() == reloaded.keys() and all(torch.equal(original[k], reloaded[k]) for k in original)


def test_new_checkpoints_record_the_int8_tower(source, tmp_path):
    _, model, _, _ = load_pretrained_model(source, dtype="bfloat16")
    out = save_quantized(quantize_model(model, "int4", group_size=32), source, tmp_path / "q")
    assert json.loads((out / "config.json").read_text())["quantization"]["vision_mode"] == "int8"
    _, loaded, _, _ = load_quantized(out)
    assert isinstance(loaded.model.vision_tower.vision_tower.vision_model.encoder.layers[0].mlp.fc1, Int8Linear)
