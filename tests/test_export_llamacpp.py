"""Exported GGUF files run in llama.cpp itself (llama-cpp-python) and agree with this project's model.

(a) text: same tokens, close logits, same greedy continuation (f32; q8_0 against our model holding the
    file's dequantized weights);
(b) mmproj: llama.cpp's image embeddings equal our vision tower + projector computed the way llama.cpp runs
    each file layout (default: the patches alone; literal: [CLS] placed after the patches, llamacpp_gguf.md
    section 6), for ldp and ldpv2, and the default file is the closer one to our model;
(c) image + prompt through llama.cpp's multimodal path: same prompt ids and the same greedy answer as our
    language model fed the same image embeddings.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed; .ci/run builds it (docs/export.md)")

from PIL import Image  # noqa: E402

from mobilevlm.constants import IMAGE_TOKEN_INDEX  # noqa: E402
from mobilevlm.export.gguf_export import export_gguf  # noqa: E402
from mobilevlm.export.llamacpp_runtime import MEDIA_MARKER, LlamaCppVLM  # noqa: E402
from mobilevlm.testing import make_tiny_checkpoint  # noqa: E402

QUESTION = "What colour is the square?"


def _v1_prompt(user_text: str) -> str:
    from mobilevlm.conversation import conv_templates

    conv = conv_templates["v1"].copy()
    conv.append_message(conv.roles[0], user_text)
    conv.append_message(conv.roles[1], None)
    return conv.get_prompt()


@pytest.fixture(scope="module", params=["tiny_v2", "tiny_v1"])
def setup(request, tmp_path_factory):
    from mobilevlm.model.loading import load_pretrained_model

    root = tmp_path_factory.mktemp(request.param)
    ckpt = make_tiny_checkpoint(root / request.param, request.param, seed=4)  # a seed whose greedy answers vary
    files = {t: export_gguf(ckpt, root / "out", t) for t in ("f32", "q8_0")}
    files["literal"] = export_gguf(ckpt, root / "literal", "f32", literal_cls=True)
    tokenizer, model, image_processor, _ = load_pretrained_model(ckpt, dtype=torch.float32)
    return dict(files=files, tokenizer=tokenizer, model=model.eval(), image_processor=image_processor,
                preset=request.param)


@pytest.fixture(scope="module")
def image():
    pixels = np.random.default_rng(0).integers(0, 256, size=(96, 96, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")  # already 96x96: neither side resamples it


@torch.no_grad()
def _greedy_ours(model, embeds: torch.Tensor, max_new_tokens: int, eos: int) -> list[int]:
    out: list[int] = []
    embed = model.get_model().embed_tokens
    for _ in range(max_new_tokens):
        token = int(model(inputs_embeds=embeds[None]).logits[0, -1].argmax())
        out.append(token)
        if token == eos:
            break
        embeds = torch.cat([embeds, embed(torch.tensor([token]))])
    return out


def _with_gguf_weights(model, path):
    """A copy of `model` carrying the (dequantized) language-model weights stored in the GGUF at `path`."""
    import gguf

    from mobilevlm.export.language_model import _LAYER_TENSORS

    names = {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
             "output_norm.weight": "model.norm.weight"}
    for i in range(model.config.num_hidden_layers):
        names.update({f"blk.{i}.{g}.weight": f"model.layers.{i}.{hf}.weight" for hf, g in _LAYER_TENSORS.items()})
    heads = model.config.num_attention_heads
    clone = copy.deepcopy(model)
    state = clone.state_dict()
    for tensor in gguf.GGUFReader(path).tensors:
        weight = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(state[names[tensor.name]].shape)
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):  # undo the RoPE row permutation
            weight = weight.reshape(heads, -1, 2, weight.shape[1]).swapaxes(1, 2).reshape(weight.shape)
        state[names[tensor.name]].copy_(torch.from_numpy(np.array(weight, dtype=np.float32)))
    return clone


@pytest.mark.parametrize("outtype, logit_tol", [("f32", 2e-3), ("q8_0", 0.1)])  # f32: llama.cpp keeps an F16 KV cache
@torch.no_grad()
def test_text_prompt_matches_in_llamacpp(setup, outtype, logit_tol):
    """Close logits to our model; the same greedy answer as our model holding the weights the file stores.

    For q8_0 the greedy reference is our model with the file's dequantized weights: the tiny random model's
    top-2 logits are often closer than the quantization error, so the f32 model's answer is no fixed target.
    """
    if setup["preset"] != "tiny_v2":
        pytest.skip("the language model is the same for both projectors")
    tokenizer, model = setup["tokenizer"], setup["model"]
    path = setup["files"][outtype].language_model
    prompt = _v1_prompt(QUESTION)
    ids = tokenizer(prompt).input_ids
    reference = model if outtype == "f32" else _with_gguf_weights(model, path)
    if outtype != "f32":
        assert not torch.equal(reference.lm_head.weight, model.lm_head.weight)  # really quantized
    expected = _greedy_ours(reference, reference.get_model().embed_tokens(torch.tensor(ids)), 12, tokenizer.eos_token_id)
    with LlamaCppVLM(path) as vlm:
        assert vlm.tokenize(prompt) == ids
        theirs = vlm.text_logits(ids)
        answer = vlm.greedy_text(ids, 12)
    ours = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    assert np.abs(theirs - ours).max() < logit_tol * np.abs(ours).max()
    assert answer == expected


def _llamacpp_order_features(model, pixels: torch.Tensor, literal_cls: bool) -> torch.Tensor:
    """Our tower + projector, computed as llama.cpp runs the mmproj file.

    Literal file: [CLS] after the patches, position rows in order, output rows 1..576. Default file (no
    class embedding, CLIP's position rows 1..576): the patches alone, each with its own position, all kept.
    The conv kernels are rounded to F16 as the mmproj stores them.
    """
    tower = model.get_model().vision_tower
    clip = tower.vision_tower.vision_model
    emb = clip.embeddings
    kernel = emb.patch_embedding.weight.half().float()
    patches = F.conv2d(pixels, kernel, stride=emb.patch_embedding.stride).flatten(2).transpose(1, 2)
    table = emb.position_embedding.weight
    if literal_cls:
        hidden = torch.cat([patches, emb.class_embedding.view(1, 1, -1)], dim=1) + table[None]
    else:
        hidden = patches + table[None, 1:]
    hidden = clip.pre_layrnorm(hidden)
    for layer in clip.encoder.layers[: tower.num_layers_used]:
        hidden = layer(hidden, attention_mask=None)
        hidden = hidden[0] if isinstance(hidden, tuple) else hidden
    projector = copy.deepcopy(model.get_model().mm_projector)
    for param in projector.parameters():
        if param.ndim == 4 and param.shape[1] == 1:  # depthwise kernels: F16 in the mmproj
            param.data = param.data.half().float()
    return projector(hidden[:, 1:] if literal_cls else hidden)[0]


def _llamacpp_image_embeddings(files, image) -> np.ndarray:
    with LlamaCppVLM(files.language_model, files.mmproj) as vlm:
        return vlm.image_embeddings(image)


@pytest.mark.parametrize("layout", ["default", "literal"])
@torch.no_grad()
def test_mmproj_embeddings_match_how_llamacpp_runs_the_file(setup, image, layout):
    from mobilevlm.processing import process_images

    model = setup["model"]
    pixels = process_images([image], setup["image_processor"], "pad")
    theirs = _llamacpp_image_embeddings(setup["files"]["f32" if layout == "default" else "literal"], image)
    assert theirs.shape == (144, model.config.hidden_size)
    simulated = _llamacpp_order_features(model, pixels, literal_cls=layout == "literal").numpy()
    exact = model.encode_images(pixels)[0].numpy()
    assert np.abs(theirs - simulated).max() < 5e-3 * np.abs(simulated).max()
    if layout == "literal":  # the documented [CLS]-ordering defect: far more than rounding
        assert np.abs(theirs - exact).max() > 10 * np.abs(theirs - simulated).max()


def _cosine_per_token(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


@torch.no_grad()
def test_default_mmproj_is_closer_to_our_model_than_the_literal_one(setup, image):
    """The reason for the default layout (docs/export.md has the numbers on full-size towers too)."""
    from mobilevlm.processing import process_images

    exact = setup["model"].encode_images(process_images([image], setup["image_processor"], "pad"))[0].numpy()
    default = _llamacpp_image_embeddings(setup["files"]["f32"], image)
    literal = _llamacpp_image_embeddings(setup["files"]["literal"], image)
    # On these tiny towers the class token barely draws attention, so leaving it out costs little and the
    # misplaced one costs much: a tenfold margin (full-size towers: docs/export.md).
    assert 1 - _cosine_per_token(default, exact).mean() < 0.1 * (1 - _cosine_per_token(literal, exact).mean())
    assert np.abs(default - exact).max() < 0.1 * np.abs(literal - exact).max()


@torch.no_grad()
def test_image_prompt_generates_through_llamacpp_multimodal_path(setup, image):
    import gguf
    import jinja2

    from mobilevlm.processing import tokenizer_image_token

    tokenizer, model, files = setup["tokenizer"], setup["model"], setup["files"]["f32"]
    template = gguf.GGUFReader(files.language_model).get_field("tokenizer.chat_template").contents()
    prompt = jinja2.Environment().from_string(template).render(
        messages=[{"role": "user", "content": f"{MEDIA_MARKER}\n{QUESTION}"}], add_generation_prompt=True)
    ours_prompt = _v1_prompt(f"<image>\n{QUESTION}")
    assert prompt == ours_prompt.replace("<image>", MEDIA_MARKER)
    with LlamaCppVLM(files.language_model, files.mmproj) as vlm:
        ids = vlm.prompt_ids(prompt, image)
        assert ids == tokenizer_image_token(ours_prompt, tokenizer)
        answer = vlm.greedy_multimodal(prompt, image, 10)
        image_embeds = torch.from_numpy(vlm.image_embeddings(image))
    assert len(answer) >= 1
    split = ids.index(IMAGE_TOKEN_INDEX)
    embed = model.get_model().embed_tokens
    embeds = torch.cat([embed(torch.tensor(ids[:split])), image_embeds, embed(torch.tensor(ids[split + 1:]))])
    assert answer == _greedy_ours(model, embeds, 10, tokenizer.eos_token_id)
