"""The language-model GGUF: MobileLLaMA (or Vicuna) as llama.cpp's `llama` architecture.

Tensor names and metadata keys follow llamacpp_gguf.md section 8. The vision tower and projector tensors
of a MobileVLM checkpoint are not part of this file (they go to the mmproj file).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, RopeScalingType

from mobilevlm.errors import CheckpointError
from mobilevlm.export.checkpoint import CheckpointTensors
from mobilevlm.export.tensors import OUTTYPES, PlannedTensor, matrix_type, write_gguf
from mobilevlm.export.vocab import add_tokenizer

# HF LLaMA per-layer weight -> llama.cpp name (blk.N.<name>.weight).
_LAYER_TENSORS = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def rope_permute(weight: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder q/k rows from HF's rotate-half RoPE layout to the adjacent-pair layout llama.cpp's `llama` uses.

    Each head's rows [x_0..x_{d/2-1}, y_0..y_{d/2-1}] become [x_0, y_0, x_1, y_1, ...].
    """
    rows = weight.shape[0]
    return weight.reshape(n_head, 2, rows // n_head // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _rope_scaling(config) -> float | None:
    params = dict(getattr(config, "rope_parameters", None) or {})
    rope_type = params.get("rope_type", "default")
    if rope_type == "default":
        return None
    if rope_type == "linear":
        return float(params["factor"])
    raise CheckpointError(
        f"config.json rope scaling type {rope_type!r} is not exported (only none or 'linear' map to llama.cpp here)"
    )


def _planned(ckpt: CheckpointTensors, config, outtype: str) -> list[PlannedTensor]:
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads

    def matrix(src: str, dst: str, permute_heads: int | None = None) -> PlannedTensor:
        def produce() -> np.ndarray:
            data = ckpt.load(src).numpy()
            return rope_permute(data, permute_heads) if permute_heads else data

        shape = ckpt.shape(src)
        return PlannedTensor(dst, shape, matrix_type(shape, outtype), produce)

    def vector(src: str, dst: str) -> PlannedTensor:
        return PlannedTensor(dst, ckpt.shape(src), GGMLQuantizationType.F32, lambda: ckpt.load(src).numpy())

    plan = [matrix("model.embed_tokens.weight", "token_embd.weight")]
    for i in range(config.num_hidden_layers):
        for hf_name, gguf_name in _LAYER_TENSORS.items():
            src, dst = f"model.layers.{i}.{hf_name}.weight", f"blk.{i}.{gguf_name}.weight"
            if hf_name.endswith("layernorm"):
                plan.append(vector(src, dst))
            else:
                heads = {"self_attn.q_proj": n_head, "self_attn.k_proj": n_kv}.get(hf_name)
                plan.append(matrix(src, dst, heads))
    plan.append(vector("model.norm.weight", "output_norm.weight"))
    # Tied embeddings have no lm_head; llama.cpp then reuses token_embd, as the HF model does.
    if "lm_head.weight" in ckpt:
        plan.append(matrix("lm_head.weight", "output.weight"))
    return plan


def _check_shapes(ckpt: CheckpointTensors, config, plan: list[PlannedTensor]) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    n_kv = config.num_key_value_heads or config.num_attention_heads
    expected = {
        "token_embd.weight": (config.vocab_size, config.hidden_size),
        "blk.0.attn_q.weight": (config.num_attention_heads * head_dim, config.hidden_size),
        "blk.0.attn_k.weight": (n_kv * head_dim, config.hidden_size),
        "blk.0.ffn_up.weight": (config.intermediate_size, config.hidden_size),
    }
    for t in plan:
        if t.name in expected and t.shape != expected[t.name]:
            raise CheckpointError(
                f"{ckpt.model_dir}: tensor {t.name} has shape {t.shape}, config.json implies {expected[t.name]}"
            )
    if config.num_hidden_layers and f"model.layers.{config.num_hidden_layers}.input_layernorm.weight" in ckpt:
        raise CheckpointError(f"{ckpt.model_dir}: weights have more layers than num_hidden_layers={config.num_hidden_layers}")


def write_language_model(ckpt: CheckpointTensors, config, outtype: str, path: Path) -> Path:
    """Write the `llama`-architecture GGUF for the checkpoint's language model to `path`."""
    if config.hidden_act != "silu":
        raise CheckpointError(f"config.json hidden_act={config.hidden_act!r}: llama.cpp's llama graph uses SiLU")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise CheckpointError("config.json enables attention/MLP biases, which MobileLLaMA has not and this exporter does not write")
    plan = _planned(ckpt, config, outtype)
    _check_shapes(ckpt, config, plan)
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads

    writer = GGUFWriter(path=None, arch="llama")
    writer.add_name(ckpt.model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads or config.num_attention_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_rope_dimension_count(head_dim)
    if head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    factor = _rope_scaling(config)
    if factor is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(factor)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(OUTTYPES[outtype][1])
    writer.add_quantization_version(2)
    add_tokenizer(writer, ckpt.model_dir, config.vocab_size, getattr(config, "pad_token_id", None))
    return write_gguf(writer, path, plan)
