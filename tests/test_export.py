"""GGUF export: file contents read back with gguf's reader, refusals, CLI. (llama.cpp runs: test_export_llamacpp.py)"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")

from mobilevlm.errors import CheckpointError  # noqa: E402
from mobilevlm.export.gguf_export import export_gguf  # noqa: E402
from mobilevlm.export.language_model import rope_permute  # noqa: E402
from mobilevlm.testing import make_tiny_checkpoint  # noqa: E402


def _tensors(path) -> dict:
    return {t.name: t for t in gguf.GGUFReader(path).tensors}


def _field(reader, key):
    return reader.get_field(key).contents()


@pytest.fixture(scope="module")
def v2_ckpt(tmp_path_factory):
    return make_tiny_checkpoint(tmp_path_factory.mktemp("v2") / "tiny_v2", "tiny_v2")


@pytest.fixture(scope="module")
def v2_f32(v2_ckpt, tmp_path_factory):
    return export_gguf(v2_ckpt, tmp_path_factory.mktemp("out"), "f32")


def _state_dict(ckpt):
    from safetensors.torch import load_file

    return load_file(str(ckpt / "model.safetensors"))


def test_rope_permute_turns_rotate_half_into_adjacent_pairs():
    """q.k under HF rotate-half RoPE equals (permuted q).(permuted k) under llama.cpp's adjacent-pair RoPE."""
    torch.manual_seed(0)
    n_head, head_dim, d = 2, 8, 16
    wq, wk, x, y = torch.randn(n_head * head_dim, d), torch.randn(n_head * head_dim, d), torch.randn(d), torch.randn(d)
    freqs = 10000.0 ** (-torch.arange(0, head_dim, 2).float() / head_dim)

    def rotate_half(v, pos):  # HF: pairs (i, i + d/2)
        a, b, cos, sin = v[: head_dim // 2], v[head_dim // 2:], torch.cos(freqs * pos), torch.sin(freqs * pos)
        return torch.cat([a * cos - b * sin, b * cos + a * sin])

    def adjacent(v, pos):  # llama.cpp "normal" RoPE: pairs (2i, 2i + 1)
        a, b, cos, sin = v[0::2], v[1::2], torch.cos(freqs * pos), torch.sin(freqs * pos)
        return torch.stack([a * cos - b * sin, b * cos + a * sin], dim=1).reshape(-1)

    q, k = (wq @ x).view(n_head, head_dim), (wk @ y).view(n_head, head_dim)
    qp = (torch.from_numpy(rope_permute(wq.numpy(), n_head)) @ x).view(n_head, head_dim)
    kp = (torch.from_numpy(rope_permute(wk.numpy(), n_head)) @ y).view(n_head, head_dim)
    for h in range(n_head):
        expected = rotate_half(q[h], 7) @ rotate_half(k[h], 2)
        assert torch.allclose(adjacent(qp[h], 7) @ adjacent(kp[h], 2), expected, atol=1e-4)
        # Unpermuted weights under llama.cpp's RoPE give different attention scores: the permutation matters.
        assert not torch.allclose(adjacent(q[h], 7) @ adjacent(k[h], 2), expected, atol=1e-2)


def test_language_model_file(v2_ckpt, v2_f32):
    reader = gguf.GGUFReader(v2_f32.language_model)
    assert _field(reader, "general.architecture") == "llama"
    assert _field(reader, "llama.block_count") == 2
    assert _field(reader, "llama.embedding_length") == 64
    assert _field(reader, "llama.attention.head_count") == 4
    assert _field(reader, "tokenizer.ggml.add_bos_token") is True
    assert (_field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")) == (1, 2)
    tensors = _tensors(v2_f32.language_model)
    assert not any(name.startswith(("v.", "mm.")) for name in tensors)  # vision side lives in the mmproj only
    assert len(tensors) == 1 + 2 * 9 + 2
    state = _state_dict(v2_ckpt)
    np.testing.assert_array_equal(tensors["token_embd.weight"].data, state["model.embed_tokens.weight"].numpy())
    np.testing.assert_array_equal(tensors["blk.1.ffn_down.weight"].data, state["model.layers.1.mlp.down_proj.weight"].numpy())
    q = state["model.layers.0.self_attn.q_proj.weight"].numpy()
    np.testing.assert_array_equal(tensors["blk.0.attn_q.weight"].data, rope_permute(q, 4))
    np.testing.assert_array_equal(tensors["blk.0.attn_v.weight"].data, state["model.layers.0.self_attn.v_proj.weight"].numpy())


def test_vocabulary_matches_tokenizer(v2_ckpt, v2_f32):
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(v2_ckpt / "tokenizer.model"))
    reader = gguf.GGUFReader(v2_f32.language_model)
    tokens = _field(reader, "tokenizer.ggml.tokens")
    types = _field(reader, "tokenizer.ggml.token_type")
    assert len(tokens) == len(set(tokens)) == 512
    assert [sp.id_to_piece(i) for i in range(sp.get_piece_size())] == tokens[: sp.get_piece_size()]
    assert types[0] == gguf.TokenType.UNKNOWN and types[1] == types[2] == gguf.TokenType.CONTROL
    assert types[3 + 0x0A] == gguf.TokenType.BYTE and tokens[3 + 0x0A] == "<0x0A>"
    assert _field(reader, "tokenizer.ggml.scores")[300] == pytest.approx(sp.get_score(300))


def test_chat_template_renders_the_v1_prompt(v2_f32):
    jinja2 = pytest.importorskip("jinja2")
    from mobilevlm.conversation import conv_templates

    template = jinja2.Environment().from_string(_field(gguf.GGUFReader(v2_f32.language_model), "tokenizer.chat_template"))
    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], "<image>\nWhat is it?")
    conv.append_message(conv.roles[1], "A cat.")
    conv.append_message(conv.roles[0], "And its colour?")
    conv.append_message(conv.roles[1], None)
    messages = [{"role": "user", "content": "<image>\nWhat is it?"}, {"role": "assistant", "content": "A cat."},
                {"role": "user", "content": "And its colour?"}]
    assert template.render(messages=messages, add_generation_prompt=True) == conv.get_prompt()
    custom = template.render(messages=[{"role": "system", "content": "Be brief."}, messages[0]], add_generation_prompt=True)
    assert custom == "Be brief. USER: <image>\nWhat is it? ASSISTANT:"


def test_mmproj_file(v2_ckpt, v2_f32):
    reader = gguf.GGUFReader(v2_f32.mmproj)
    assert _field(reader, "general.architecture") == "clip"
    assert _field(reader, "clip.projector_type") == "ldpv2"
    # The tiny tower has 3 layers and MobileVLM reads hidden_states[-2]: 2 stored, both run by llama.cpp.
    assert _field(reader, "clip.vision.block_count") == 2
    assert _field(reader, "clip.vision.feature_layer") == [2]
    assert (_field(reader, "clip.vision.image_size"), _field(reader, "clip.vision.patch_size")) == (96, 4)
    assert _field(reader, "clip.use_gelu") is False
    assert _field(reader, "clip.vision.image_mean") == pytest.approx([0.48145466, 0.4578275, 0.40821073])
    tensors = _tensors(v2_f32.mmproj)
    assert "v.blk.2.attn_q.weight" not in tensors and "v.blk.1.attn_q.weight" in tensors
    assert not any(name.startswith(("blk.", "token_embd")) for name in tensors)
    state = _state_dict(v2_ckpt)
    tower = "model.vision_tower.vision_tower.vision_model."
    fc1 = state[tower + "encoder.layers.1.mlp.fc1.weight"].numpy()
    np.testing.assert_array_equal(tensors["v.blk.1.ffn_up.weight"].data, fc1)
    peg = state["model.mm_projector.peg.peg.0.weight"].numpy()
    assert tensors["mm.model.peg.0.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    np.testing.assert_array_equal(tensors["mm.model.peg.0.weight"].data, peg.reshape(64, 3, 3).astype(np.float16))
    np.testing.assert_array_equal(tensors["mm.model.mlp.2.bias"].data, state["model.mm_projector.mlp.mlp.2.bias"].numpy())


def test_mmproj_cls_layouts(v2_ckpt, v2_f32, tmp_path):
    """Default file: no class embedding, CLIP's position rows 1..576 (the patches'); literal: CLIP's tensors as they are.

    Everything else is the same in both files.
    """
    tower = "model.vision_tower.vision_tower.vision_model.embeddings."
    state = _state_dict(v2_ckpt)
    table = state[tower + "position_embedding.weight"].numpy()
    assert table.shape == (577, 32)
    default = _tensors(v2_f32.mmproj)
    assert "v.class_embd" not in default
    np.testing.assert_array_equal(default["v.position_embd.weight"].data, table[1:])
    literal_file = export_gguf(v2_ckpt, tmp_path, "f32", literal_cls=True).mmproj
    literal = _tensors(literal_file)
    np.testing.assert_array_equal(literal["v.class_embd"].data, state[tower + "class_embedding"].numpy())
    np.testing.assert_array_equal(literal["v.position_embd.weight"].data, table)
    assert set(literal) - set(default) == {"v.class_embd"}
    for name in default:
        if name != "v.position_embd.weight":
            np.testing.assert_array_equal(default[name].data, literal[name].data, err_msg=name)
    reader = gguf.GGUFReader(literal_file)
    assert _field(reader, "clip.vision.block_count") == 2 and _field(reader, "clip.projector_type") == "ldpv2"


def test_ldp_v1_projector_names_and_squeezed_kernels(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "tiny_v1", "tiny_v1")
    result = export_gguf(ckpt, tmp_path / "out", "f16")
    assert _field(gguf.GGUFReader(result.mmproj), "clip.projector_type") == "ldp"
    tensors = _tensors(result.mmproj)
    for block in (1, 2):
        prefix = f"mm.model.mb_block.{block}.block."
        assert tuple(tensors[prefix + "0.0.weight"].shape) == (3, 3, 64)  # GGUF order of a [C,3,3] kernel
        assert tuple(tensors[prefix + "1.fc1.weight"].shape) == (64, 16)  # 1x1 conv as a [S, C] matrix
        assert tuple(tensors[prefix + "2.0.weight"].shape) == (64, 64)
    assert {f"mm.model.mlp.{i}.{k}" for i in (1, 3) for k in ("weight", "bias")} <= set(tensors)
    assert len([n for n in tensors if n.startswith("mm.")]) == 4 + 2 * 10  # mlp + two inverted-residual blocks


def test_quantized_language_model(v2_ckpt, tmp_path):
    result = export_gguf(v2_ckpt, tmp_path, "q4_0")
    reader = gguf.GGUFReader(result.language_model)
    assert _field(reader, "general.file_type") == gguf.LlamaFileType.MOSTLY_Q4_0
    tensors = _tensors(result.language_model)
    down = tensors["blk.0.ffn_down.weight"]
    assert down.tensor_type == gguf.GGMLQuantizationType.Q4_0
    assert tensors["blk.0.attn_norm.weight"].tensor_type == gguf.GGMLQuantizationType.F32
    restored = gguf.quants.dequantize(down.data, down.tensor_type)
    original = _state_dict(v2_ckpt)["model.layers.0.mlp.down_proj.weight"].numpy()
    error = np.abs(restored - original).max()
    assert 0 < error < 0.1 * np.abs(original).max()
    # The mmproj is not quantized: F16 matrices as llama.cpp's own converter writes them.
    assert _tensors(result.mmproj)["v.blk.0.attn_q.weight"].tensor_type == gguf.GGMLQuantizationType.F16


@pytest.mark.parametrize("weights, index", [("bin", "pytorch_model.bin.index.json"),
                                            ("safetensors", "model.safetensors.index.json")])
def test_sharded_checkpoints_export_the_same_tensors(v2_f32, tmp_path, weights, index):
    ckpt = make_tiny_checkpoint(tmp_path / weights, "tiny_v2", weights=weights, max_shard_size="100KB")
    assert (ckpt / index).is_file()
    result = export_gguf(ckpt, tmp_path / "out", "f32")
    for ours, reference in ((result.language_model, v2_f32.language_model), (result.mmproj, v2_f32.mmproj)):
        got, want = _tensors(ours), _tensors(reference)
        assert list(got) == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name].data, want[name].data, err_msg=name)


def test_tensors_are_streamed_one_at_a_time(tmp_path):
    """Each tensor is produced only after the previous one was written and released (bounded memory)."""
    import weakref

    from mobilevlm.export.tensors import PlannedTensor, write_gguf

    released = []

    def producer(i):
        def produce():
            assert all(ref() is None for ref in released), "an earlier tensor is still held in memory"
            data = np.full((4, 32), float(i), dtype=np.float32)
            released.append(weakref.ref(data))
            return data
        return produce

    types = [gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F16]
    plan = [PlannedTensor(f"t{i}", (4, 32), types[i % 3], producer(i)) for i in range(6)]
    path = write_gguf(gguf.GGUFWriter(None, "llama"), tmp_path / "s.gguf", plan)
    for i, tensor in enumerate(_tensors(path).values()):
        values = gguf.quants.dequantize(tensor.data, tensor.tensor_type) if i % 3 == 1 else tensor.data
        np.testing.assert_allclose(values, np.full((4, 32), float(i)), atol=1e-3)  # Q8_0 scales are F16


def test_failed_write_leaves_no_file(tmp_path):
    from mobilevlm.export.tensors import PlannedTensor, write_gguf

    def broken():
        raise CheckpointError("shard unreadable")

    plan = [PlannedTensor("ok", (2, 32), gguf.GGMLQuantizationType.F32, lambda: np.zeros((2, 32), np.float32)),
            PlannedTensor("bad", (2, 32), gguf.GGMLQuantizationType.F32, broken)]
    with pytest.raises(CheckpointError, match="shard unreadable"):
        write_gguf(gguf.GGUFWriter(None, "llama"), tmp_path / "x.gguf", plan)
    assert list(tmp_path.iterdir()) == []


def test_text_only_mobilellama_exports_the_language_model_alone(tmp_path):
    ckpt = make_tiny_checkpoint(tmp_path / "llama", "tiny_llama")
    result = export_gguf(ckpt, tmp_path / "out", "q8_0")
    assert result.mmproj is None
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["llama-q8_0.gguf"]
    assert _tensors(result.language_model)["blk.0.attn_k.weight"].tensor_type == gguf.GGMLQuantizationType.Q8_0


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(mm_projector_type="mlp2x_gelu"), "mlp2x_gelu"),
        (dict(mm_vision_select_feature="cls_patch"), "CLS"),
        (dict(mm_vision_tower_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                          num_attention_heads=2, image_size=64, patch_size=4, projection_dim=32,
                                          hidden_act="quick_gelu", layer_norm_eps=1e-5)), "16x16"),
    ],
)
def test_refuses_what_llamacpp_cannot_run(tmp_path, overrides, message):
    ckpt = make_tiny_checkpoint(tmp_path / "ckpt", "tiny_v2", **overrides)
    with pytest.raises(CheckpointError, match=message):
        export_gguf(ckpt, tmp_path / "out", "f16")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_refuses_inconsistent_weights(v2_ckpt, tmp_path):
    import json
    import shutil

    broken = tmp_path / "broken"
    shutil.copytree(v2_ckpt, broken)
    config = json.loads((broken / "config.json").read_text())
    config["intermediate_size"] = 96
    (broken / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="blk.0.ffn_up.weight"):
        export_gguf(broken, tmp_path / "out", "f16")


def test_refuses_a_checkpoint_without_vision_weights(v2_ckpt, tmp_path):
    import shutil

    from safetensors.torch import save_file

    stripped = tmp_path / "stripped"
    shutil.copytree(v2_ckpt, stripped)
    state = {k: v for k, v in _state_dict(v2_ckpt).items() if not k.startswith("model.vision_tower.")}
    save_file(state, str(stripped / "model.safetensors"))
    with pytest.raises(CheckpointError, match="no vision tower"):
        export_gguf(stripped, tmp_path / "out", "f16")


def test_cli(v2_ckpt, tmp_path, capsys):
    from mobilevlm.cli import main

    assert main(["export", "gguf", "--model", str(v2_ckpt), "--outdir", str(tmp_path), "--outtype", "q8_0"]) == 0
    out = capsys.readouterr().out
    assert "tiny_v2-q8_0.gguf" in out and "mmproj-tiny_v2-f16.gguf" in out
    assert "v.class_embd" not in _tensors(tmp_path / "mmproj-tiny_v2-f16.gguf")
    assert main(["export", "gguf", "--model", str(v2_ckpt), "--outdir", str(tmp_path), "--literal-cls"]) == 0
    assert "v.class_embd" in _tensors(tmp_path / "mmproj-tiny_v2-f16.gguf")
    capsys.readouterr()
    assert main(["export", "gguf", "--model", str(tmp_path / "missing"), "--outdir", str(tmp_path)]) == 1
    assert "no such model directory" in capsys.readouterr().err
