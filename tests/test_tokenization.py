"""Legacy LLaMA tokenization and the chunk-wise `<image>` layout of §3.1, checked against SentencePiece itself."""
from __future__ import annotations

import pytest
import sentencepiece as spm
import torch

from mobilevlm.constants import IMAGE_TOKEN_INDEX as IMG
from mobilevlm.processing import tokenizer_image_token
from mobilevlm.tokenizer import load_tokenizer

SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
          "The assistant gives helpful, detailed, and polite answers to the user's questions.")
V1_PROMPT = SYSTEM + " USER: <image>\nWhat is in the image? ASSISTANT:"


@pytest.fixture(scope="module")
def tokenizer(tiny_v2_dir):
    return load_tokenizer(tiny_v2_dir)


@pytest.fixture(scope="module")
def sp(sp_model_path):
    return spm.SentencePieceProcessor(model_file=str(sp_model_path))


def test_trained_model_is_llama_style(sp, tokenizer):
    assert [sp.id_to_piece(i) for i in (0, 1, 2)] == ["<unk>", "<s>", "</s>"]
    assert [sp.id_to_piece(i) for i in (3, 13, 258)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    assert sp.encode("\n", out_type=str) == ["▁", "<0x0A>"]
    assert "☕" not in [sp.id_to_piece(i) for i in range(sp.get_piece_size())]  # so it needs byte fallback
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (0, 1, 2, 0)


@pytest.mark.parametrize("text", ["What is in the image?", " x", "  two spaces", "\nnew line", "digits 2024",
                                  "café ☕ 猫", "ASSISTANT: A red circle.", ""])
def test_plain_text_is_bos_plus_sentencepiece(tokenizer, sp, text):
    assert tokenizer(text).input_ids == [1] + sp.encode(text)


@pytest.mark.parametrize("text", ["What is in the image?", "café ☕ 猫 and\nlines", " leading space"])
def test_decode_round_trip(tokenizer, text):
    ids = tokenizer(text).input_ids
    assert tokenizer.decode(ids, skip_special_tokens=True) == text  # SentencePiece drops only the dummy prefix


def test_special_token_in_text_is_legacy(tokenizer, sp):
    # legacy slow tokenizer: the text after a special token gets its own dummy prefix ("▁USER")
    ids = tokenizer("A.</s>USER: B").input_ids
    assert ids == [1] + sp.encode("A.") + [2] + sp.encode("USER: B")
    assert tokenizer.convert_ids_to_tokens(ids)[len(sp.encode("A.")) + 2] == "▁USER"


def test_v1_prompt_layout_around_image(tokenizer, sp):
    ids = tokenizer_image_token(V1_PROMPT, tokenizer)
    before, after = V1_PROMPT.split("<image>")
    assert ids == [1] + sp.encode(before) + [IMG] + sp.encode(after)
    space, colon = sp.piece_to_id("▁"), sp.piece_to_id(":")
    at = ids.index(IMG)
    assert ids[at - 2:at + 3] == [colon, space, IMG, space, 13]  # ':' '▁' <image> '▁' '\n'
    assert ids.count(1) == 1 and ids[0] == 1 and ids.count(IMG) == 1 and 2 not in ids


@pytest.mark.parametrize("prompt", ["<image>\n<image>\nCompare them.", "Look: <image> and <image>", "<image>",
                                    "no image here"])
def test_chunkwise_tokenization(tokenizer, sp, prompt):
    expected = [1]
    for i, chunk in enumerate(prompt.split("<image>")):
        expected += ([IMG] if i else []) + sp.encode(chunk)
    assert tokenizer_image_token(prompt, tokenizer) == expected
    tensor = tokenizer_image_token(prompt, tokenizer, return_tensors="pt")
    assert tensor.dtype == torch.long and tensor.tolist() == expected


def test_custom_image_index_and_bad_tensor_type(tokenizer):
    assert tokenizer_image_token("a <image> b", tokenizer, image_token_index=-7).count(-7) == 1
    with pytest.raises(ValueError, match="tf"):
        tokenizer_image_token("a <image> b", tokenizer, return_tensors="tf")


def test_missing_tokenizer_model_is_named(tmp_path):
    from mobilevlm.errors import CheckpointError

    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(tmp_path)
