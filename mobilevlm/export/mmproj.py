"""The mmproj GGUF: CLIP vision tower + LDP / LDPv2 projector as llama.cpp's `clip` file.

Keys and tensor names follow llamacpp_gguf.md sections 4-5. Only the ViT layers the model uses are stored
(MobileVLM reads hidden_states[-2], i.e. all but the last layer), and `clip.vision.feature_layer` names the
last of them: without it llama.cpp would run one layer fewer than stored (section 6, defect 2).

The class token. llama.cpp's llava-family graph (tools/mtmd/models/llava.cpp) appends `v.class_embd` after
the patches, adds position rows 0..576 in that order and keeps output rows 1..576: patches get their
neighbour's position, patch 0 is lost and the class token becomes the last cell of the 24x24 map. Without
`v.class_embd` the same graph runs the 576 patches alone, adds rows 0..575 and keeps all of them. So by
default the mmproj leaves the class embedding out and stores CLIP's position table without its row 0 (the
class token's): every patch gets its own position and its own output row, and the only thing missing is the
class token's share of each attention layer. docs/export.md has the measured error of both files;
`literal_cls=True` writes CLIP's tensors unchanged, for a llama.cpp with the ordering fixed (PR #25844).
"""
from __future__ import annotations

from pathlib import Path

from gguf import GGMLQuantizationType, GGUFWriter

from mobilevlm.errors import CheckpointError
from mobilevlm.export.checkpoint import CheckpointTensors
from mobilevlm.export.tensors import PlannedTensor, write_gguf

TOWER = "model.vision_tower.vision_tower.vision_model."
PROJECTOR = "model.mm_projector."
# llama.cpp's ldp / ldpv2 graphs reshape the patch tokens to a fixed 24x24 map (models/llava.cpp).
LLAMACPP_GRID = 24
_PROJECTOR_TYPES = {"ldpnetv2": "ldpv2", "ldpnet": "ldp"}  # longest prefix first, as the original dispatch
_ACTIVATIONS = {"quick_gelu": False, "gelu": True}  # clip.use_gelu

CLASS_EMBD = "embeddings.class_embedding"
POSITION_EMBD = "embeddings.position_embedding.weight"
_VIT_GLOBAL = {
    "embeddings.patch_embedding.weight": "v.patch_embd.weight",
    CLASS_EMBD: "v.class_embd",
    POSITION_EMBD: "v.position_embd.weight",
    "pre_layrnorm.weight": "v.pre_ln.weight",
    "pre_layrnorm.bias": "v.pre_ln.bias",
}
_VIT_LAYER = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.out_proj": "attn_out",
    "layer_norm1": "ln1",
    "layer_norm2": "ln2",
    "mlp.fc1": "ffn_up",  # the legacy converter swaps these two names; llama.cpp accepts both, this is the right one
    "mlp.fc2": "ffn_down",
}


def llamacpp_projector_type(config) -> str:
    """llama.cpp's name for the checkpoint's projector, or a CheckpointError saying why llama.cpp cannot run it."""
    for prefix, name in _PROJECTOR_TYPES.items():
        if config.mm_projector_type.startswith(prefix):
            return name
    raise CheckpointError(
        f"config.json mm_projector_type={config.mm_projector_type!r}: llama.cpp runs MobileVLM only with the "
        "LDP ('ldpnet', V1) and LDPv2 ('ldpnetv2', V2) projectors"
    )


def _stored_layers(config, vision) -> int:
    select = config.mm_vision_select_layer
    used = select if select >= 0 else vision.num_hidden_layers + 1 + select
    if not 1 <= used <= vision.num_hidden_layers:
        raise CheckpointError(
            f"config.json mm_vision_select_layer={select} selects no encoder layer of a "
            f"{vision.num_hidden_layers}-layer tower; llama.cpp needs at least one"
        )
    return used


def check_supported(config) -> None:
    """Refuse, naming the reason, what llama.cpp's llava-family graph cannot run."""
    projector = llamacpp_projector_type(config)
    vision = config.vision_config()
    grid, rest = divmod(vision.image_size, vision.patch_size)
    if rest or grid != LLAMACPP_GRID:
        raise CheckpointError(
            f"vision tower image_size={vision.image_size}, patch_size={vision.patch_size} gives a "
            f"{vision.image_size / vision.patch_size:g}x{vision.image_size / vision.patch_size:g} patch grid; "
            f"llama.cpp's {projector} graph is hard-wired to a {LLAMACPP_GRID}x{LLAMACPP_GRID} grid"
        )
    if config.mm_vision_select_feature != "patch":
        raise CheckpointError(
            f"config.json mm_vision_select_feature={config.mm_vision_select_feature!r}: llama.cpp always drops "
            "the CLS token ('patch')"
        )
    if vision.hidden_act not in _ACTIVATIONS:
        raise CheckpointError(f"vision tower hidden_act={vision.hidden_act!r}: llama.cpp's CLIP supports {list(_ACTIVATIONS)}")
    if getattr(config, "mm_use_im_start_end", False):
        raise CheckpointError("config.json mm_use_im_start_end=true: llama.cpp's MobileVLM path has no image start/end tokens")
    _stored_layers(config, vision)


def _projector_name(name: str, projector: str) -> str:
    short = "mm." + name[len(PROJECTOR):]
    if projector == "ldpv2":
        short = short.replace("mm.mlp.mlp.", "mm.model.mlp.").replace("mm.peg.peg.", "mm.model.peg.")
    return short


def _planned(ckpt: CheckpointTensors, config, outtype: str, literal_cls: bool) -> list[PlannedTensor]:
    vision = config.vision_config()
    matrix_type = GGMLQuantizationType.F32 if outtype == "f32" else GGMLQuantizationType.F16

    def tensor(src: str, dst: str, squeeze: bool = False, first_row: int = 0) -> PlannedTensor:
        shape = ckpt.shape(src)
        shape = (shape[0] - first_row, *shape[1:])
        if squeeze:  # 1x1 and depthwise conv kernels: llama.cpp stores [O,I,1,1] as [O,I] and [C,1,3,3] as [C,3,3]
            shape = tuple(d for d in shape if d != 1) if len(shape) == 4 else shape
        if len(shape) == 1 or dst == "v.position_embd.weight":
            qtype = GGMLQuantizationType.F32
        elif len(shape) >= 3:
            qtype = GGMLQuantizationType.F16  # ggml's conv / im2col paths take F16 kernels
        else:
            qtype = matrix_type
        return PlannedTensor(dst, shape, qtype, lambda: ckpt.load(src).numpy()[first_row:].reshape(shape))

    if TOWER + "embeddings.patch_embedding.weight" not in ckpt:
        raise CheckpointError(
            f"{ckpt.model_dir}: the weights hold no vision tower ({TOWER}*); the mmproj needs the CLIP weights "
            "inside the checkpoint, as MobileVLM releases and `mobilevlm train` save them"
        )
    plan = []
    for src, dst in _VIT_GLOBAL.items():
        if literal_cls or src != CLASS_EMBD:
            # Without the class token the table keeps the patches' rows only: row 0 is the class token's.
            first_row = 1 if src == POSITION_EMBD and not literal_cls else 0
            plan.append(tensor(TOWER + src, dst, first_row=first_row))
    for i in range(_stored_layers(config, vision)):
        for src, dst in _VIT_LAYER.items():
            for kind in ("weight", "bias"):
                plan.append(tensor(f"{TOWER}encoder.layers.{i}.{src}.{kind}", f"v.blk.{i}.{dst}.{kind}"))
    projector = llamacpp_projector_type(config)
    names = sorted(n for n in ckpt.names() if n.startswith(PROJECTOR))
    if not names:
        raise CheckpointError(f"{ckpt.model_dir}: no {PROJECTOR}* tensors in the weights")
    plan += [tensor(n, _projector_name(n, projector), squeeze=True) for n in names]
    return plan


def _check_shapes(ckpt: CheckpointTensors, config, plan: list[PlannedTensor], literal_cls: bool) -> None:
    vision = config.vision_config()
    grid = vision.image_size // vision.patch_size
    shapes = {t.name: t.shape for t in plan}
    expected = {
        "v.patch_embd.weight": (vision.hidden_size, 3, vision.patch_size, vision.patch_size),
        "v.position_embd.weight": (grid * grid + (1 if literal_cls else 0), vision.hidden_size),
        "v.blk.0.ffn_up.weight": (vision.intermediate_size, vision.hidden_size),
    }
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise CheckpointError(f"{ckpt.model_dir}: vision tensor {name} has shape {shapes[name]}, the tower config implies {shape}")
    out_bias = "mm.model.peg.0.bias" if "mm.model.peg.0.bias" in shapes else "mm.model.mb_block.1.block.2.1.bias"
    if out_bias not in shapes:
        raise CheckpointError(
            f"{ckpt.model_dir}: projector tensors do not have the {llamacpp_projector_type(config)} layout "
            f"(no {out_bias}; found {', '.join(sorted(n for n in shapes if n.startswith('mm.')))})"
        )
    if shapes[out_bias] != (config.hidden_size,):
        raise CheckpointError(
            f"{ckpt.model_dir}: projector output width {shapes[out_bias][0]} differs from the LLM width {config.hidden_size}"
        )


def image_normalization(model_dir: Path, config) -> tuple[list[float], list[float]]:
    """Mean / std the checkpoint's image processor uses (its preprocessor_config.json, else CLIP's)."""
    from mobilevlm.processing import build_image_processor

    processor = build_image_processor(config.vision_config().image_size, model_dir, config.mm_vision_tower)
    return [float(v) for v in processor.image_mean], [float(v) for v in processor.image_std]


def write_mmproj(ckpt: CheckpointTensors, config, outtype: str, path: Path, literal_cls: bool = False) -> Path:
    """Write the `clip`-architecture mmproj GGUF (vision tower + projector) to `path`.

    `literal_cls` keeps CLIP's class embedding and 577-row position table; the default leaves out what
    today's llama.cpp misplaces (module docstring).
    """
    check_supported(config)
    vision = config.vision_config()
    plan = _planned(ckpt, config, outtype, literal_cls)
    _check_shapes(ckpt, config, plan, literal_cls)
    stored = _stored_layers(config, vision)
    mean, std = image_normalization(ckpt.model_dir, config)

    writer = GGUFWriter(path=None, arch="clip")
    writer.add_name(f"{ckpt.model_dir.name} vision")
    writer.add_description("MobileVLM vision tower and projector, exported by mobilevlm")
    writer.add_file_type(0 if outtype == "f32" else 1)
    writer.add_clip_has_vision_encoder(True)
    writer.add_clip_projector_type(llamacpp_projector_type(config))
    writer.add_vision_image_size(vision.image_size)
    writer.add_vision_patch_size(vision.patch_size)
    writer.add_vision_embedding_length(vision.hidden_size)
    writer.add_vision_feed_forward_length(vision.intermediate_size)
    writer.add_vision_projection_dim(config.hidden_size)
    writer.add_vision_head_count(vision.num_attention_heads)
    writer.add_vision_attention_layernorm_eps(vision.layer_norm_eps)
    writer.add_vision_block_count(stored)
    writer.add_array("clip.vision.feature_layer", [stored])
    writer.add_vision_image_mean(mean)
    writer.add_vision_image_std(std)
    writer.add_vision_use_gelu(_ACTIVATIONS[vision.hidden_act])
    return write_gguf(writer, path, plan)

