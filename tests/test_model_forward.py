"""The multimodal forward (§3) against a plain transformers LlamaForCausalLM fed hand-spliced embeddings."""
from __future__ import annotations

import pytest
import torch
from torch.nn import functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from mobilevlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX as IMG
from mobilevlm.errors import PromptError
from mobilevlm.testing import make_tiny_model

TOL = dict(rtol=1e-5, atol=1e-5)


@pytest.fixture(scope="module")
def model():
    return make_tiny_model("tiny_v2", seed=7)


@pytest.fixture(scope="module")
def llama(model):
    """transformers' LlamaForCausalLM with the language-model weights (the tiny preset's sizes written out)."""
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=1024,
                         rms_norm_eps=1e-6, tie_word_embeddings=False)
    reference = LlamaForCausalLM(config).eval()
    weights = {k: v for k, v in model.state_dict().items() if ".vision_tower." not in k and ".mm_projector." not in k}
    reference.load_state_dict(weights, strict=True)
    return reference


@pytest.fixture(scope="module")
def pixels():
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(11))


def spliced(model, ids: list[int], features) -> torch.Tensor:
    """Text embeddings with each -200 replaced by the next image's features, by hand."""
    embed = model.get_input_embeddings()
    parts, text, images = [], [], iter(features)
    for token in ids:
        if token == IMG:
            parts += [embed(torch.tensor(text, dtype=torch.long)), next(images)]
            text = []
        else:
            text.append(token)
    parts.append(embed(torch.tensor(text, dtype=torch.long)))
    return torch.cat(parts)[None]


def reference_logits(model, llama, ids, pixels=None):
    with torch.no_grad():
        features = model.encode_images(pixels) if pixels is not None else []
        return llama(inputs_embeds=spliced(model, ids, features)).logits


@pytest.mark.parametrize("ids,n_images", [
    ([1, 40, 41, IMG, 42, 43, 44], 1),
    ([1, IMG, 50, IMG, 51, 52, IMG], 3),   # several images, one at the very end
    ([1, 60, 61, 62], 0),                   # text-only prompt on a multimodal model
])
def test_splice_equals_manual_concatenation(model, llama, pixels, ids, n_images):
    images = pixels[:n_images] if n_images else None
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids]), images=images).logits
    expected = reference_logits(model, llama, ids, images)
    assert logits.shape == (1, len(ids) + n_images * 143, 512)
    torch.testing.assert_close(logits, expected, **TOL)


def test_images_as_list_per_sample(model, pixels):
    ids = torch.tensor([[1, IMG, 50, IMG, 51]])
    with torch.no_grad():
        stacked = model(input_ids=ids, images=pixels[:2]).logits
        listed = model(input_ids=ids, images=[pixels[:2]]).logits
    torch.testing.assert_close(stacked, listed, rtol=0, atol=0)


def test_labels_ignore_image_positions_and_loss_is_cross_entropy(model, llama, pixels):
    ids = [1, 70, 71, IMG, 72, 73, 74, 75]
    labels = [IGNORE_INDEX, IGNORE_INDEX, 71, IGNORE_INDEX, 72, 73, 74, 75]
    with torch.no_grad():
        out = model(input_ids=torch.tensor([ids]), images=pixels[:1], labels=torch.tensor([labels]))
        logits = reference_logits(model, llama, ids, pixels[:1])
    full_labels = torch.tensor(labels[:3] + [IGNORE_INDEX] * 144 + labels[4:])
    expected = F.cross_entropy(logits[0, :-1], full_labels[1:], ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(out.loss, expected, **TOL)
    torch.testing.assert_close(out.logits, logits, **TOL)


def test_dummy_image_slot_of_text_only_sample(model, llama, pixels):
    # the training layout: one image per sample, text-only samples carry a dummy image that is skipped
    ids = torch.tensor([[1, 80, IMG, 81], [1, 82, 83, 84]])
    with torch.no_grad():
        logits = model(input_ids=ids, images=pixels[:2]).logits
    torch.testing.assert_close(logits[0:1], reference_logits(model, llama, [1, 80, IMG, 81], pixels[:1]), **TOL)
    torch.testing.assert_close(logits[1:2, :4], reference_logits(model, llama, [1, 82, 83, 84]), **TOL)


SAMPLES = [[1, 90, IMG, 91, 92, 93, 94], [1, IMG, 95]]


def padded(side: str):
    longest = max(map(len, SAMPLES))
    rows, masks = [], []
    for ids in SAMPLES:
        pad = [0] * (longest - len(ids))
        rows.append(pad + ids if side == "left" else ids + pad)
        masks.append([0] * len(pad) + [1] * len(ids) if side == "left" else [1] * len(ids) + [0] * len(pad))
    return torch.tensor(rows), torch.tensor(masks)


@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_batch_gives_unpadded_logits(model, llama, pixels, side):
    ids, mask = padded(side)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask, images=pixels[:2]).logits
        embeds, new_mask, positions, _ = model.prepare_inputs_labels_for_multimodal(ids, mask, None, pixels[:2], padding_side="left")
        left_logits = model(inputs_embeds=embeds, attention_mask=new_mask, position_ids=positions).logits
    for b, sample in enumerate(SAMPLES):
        expected = reference_logits(model, llama, sample, pixels[b:b + 1])[0]
        n = expected.shape[0]
        torch.testing.assert_close(logits[b, :n], expected, **TOL)   # the forward re-pads on the right
        torch.testing.assert_close(left_logits[b, -n:], expected, **TOL)
        assert new_mask[b].sum() == n and bool(new_mask[b, -n:].all())
        # RoPE makes logits blind to a constant position shift, so check the positions themselves
        assert positions[b, -n:].tolist() == list(range(n))


def test_padded_batch_loss_is_mean_over_answer_tokens(model, llama, pixels):
    ids, mask = padded("right")
    labels = ids.masked_fill(mask == 0, IGNORE_INDEX).masked_fill(ids == IMG, IGNORE_INDEX)
    labels[:, :2] = IGNORE_INDEX  # as if the first tokens were the (masked) question
    with torch.no_grad():
        loss = model(input_ids=ids, attention_mask=mask, labels=labels, images=pixels[:2]).loss
    total, count = 0.0, 0
    for b, sample in enumerate(SAMPLES):
        logits = reference_logits(model, llama, sample, pixels[b:b + 1])[0]
        at = sample.index(IMG)
        lab = labels[b, :len(sample)].tolist()
        full = torch.tensor(lab[:at] + [IGNORE_INDEX] * 144 + lab[at + 1:])
        total += F.cross_entropy(logits[:-1], full[1:], ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((full[1:] != IGNORE_INDEX).sum())
    torch.testing.assert_close(loss, total / count, **TOL)


def test_kv_cache_decoding_equals_full_forward(model, pixels):
    prompt = [1, 100, IMG, 101, 102]
    continuation = [103, 104, 105]
    with torch.no_grad():
        full = model(input_ids=torch.tensor([prompt + continuation]), images=pixels[:1]).logits[0]
        out = model(input_ids=torch.tensor([prompt]), images=pixels[:1], use_cache=True)
        steps = [out.logits[0, -1]]
        cache = out.cache
        for token in continuation:
            out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits[0, -1])
    n_prompt = len(prompt) + 143
    assert cache.get_seq_length() == n_prompt + len(continuation)
    torch.testing.assert_close(torch.stack(steps), full[n_prompt - 1:], **TOL)


def test_generate_greedy_equals_argmax_of_full_forward(model, pixels):
    prompt = [1, 110, IMG, 111]
    with torch.no_grad():
        new = model.generate(torch.tensor([prompt]), images=pixels[:1], max_new_tokens=5, do_sample=False,
                             pad_token_id=0, eos_token_id=None)[0].tolist()
        assert new[:len(prompt)] == prompt  # the original's convention: the prompt ids come first
        ids = list(prompt)
        for _ in range(5):
            logits = model(input_ids=torch.tensor([ids]), images=pixels[:1]).logits[0, -1]
            ids.append(int(logits.argmax()))
    assert new == ids


def test_text_only_mobilellama_equals_llama():
    text_model = make_tiny_model("tiny_llama", seed=8)
    assert not text_model.is_multimodal and not hasattr(text_model.get_model(), "vision_tower")
    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=1024, rms_norm_eps=1e-6)
    reference = LlamaForCausalLM(config).eval()
    reference.load_state_dict(text_model.state_dict(), strict=True)
    ids = torch.tensor([[1, 5, 300, 301, 17, 2]])
    with torch.no_grad():
        torch.testing.assert_close(text_model(input_ids=ids).logits, reference(input_ids=ids).logits, **TOL)
    with pytest.raises(PromptError, match="text-only"):
        text_model.encode_images(torch.zeros(1, 3, 96, 96))


def test_placeholder_and_image_count_mismatch(model, pixels):
    with pytest.raises(PromptError, match="2 <image> placeholder.*1 image"):
        model(input_ids=torch.tensor([[1, IMG, 5, IMG]]), images=pixels[:1])
    with pytest.raises(PromptError, match="1 <image> placeholder.*3 image"):
        model(input_ids=torch.tensor([[1, IMG, 5]]), images=pixels)
    with pytest.raises(PromptError, match="1 <image> placeholder.*0 image"):
        model(input_ids=torch.tensor([[1, IMG, 5]]))
