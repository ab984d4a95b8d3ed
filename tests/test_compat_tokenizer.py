"""The checkpoint's `legacy` tokenizer setting, honoured as transformers 4.33 did (unset means legacy), checked
against SentencePiece itself; training masks stay exact in both settings."""
from __future__ import annotations

import json

import pytest

from mobilevlm.constants import IGNORE_INDEX
from mobilevlm.testing import write_tiny_tokenizer
from mobilevlm.tokenizer import load_tokenizer
from mobilevlm.train.preprocess import preprocess

TEXT = "USER: What is it? ASSISTANT: A cat.</s>USER: Where is the cat? ASSISTANT:"


def tokenizer_with(tmp_path, legacy):
    write_tiny_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("legacy")
    if legacy is not None:
        config["legacy"] = legacy
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    return load_tokenizer(tmp_path)


@pytest.mark.parametrize("legacy", [None, True, False])
def test_text_after_a_special_token(tmp_path, legacy):
    tok = tokenizer_with(tmp_path, legacy)
    sp = tok.sp_model
    before, after = TEXT.split("</s>")
    rest = sp.encode(after, out_type=str)
    if legacy is False:  # 4.33 non-legacy: the first piece after "</s>" loses its '▁' (and may become <unk>)
        rest = [rest[0][1:]] + rest[1:]
    expected = [tok.bos_token_id] + sp.encode(before) + [tok.eos_token_id] + [sp.piece_to_id(p) for p in rest]
    assert tok(TEXT).input_ids == expected
    assert tok.legacy is (legacy is not False)
    # a prompt's own start and a literal special token in the middle keep the dummy prefix rule of their mode
    assert tok("Hello world").input_ids == [tok.bos_token_id] + sp.encode("Hello world")


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("has_image", [True, False])
def test_v1_masks_are_exact_in_both_settings(tmp_path, legacy, has_image):
    tok = tokenizer_with(tmp_path, legacy)
    first = "<image>\nWhat is in the image?" if has_image else "What is in the image?"
    turns = [{"from": "human", "value": first}, {"from": "gpt", "value": "A red circle."},
             {"from": "human", "value": "Where is the cat?"}, {"from": "gpt", "value": "On the mat."}]
    result = preprocess("v1", turns, tok, has_image, 2048)
    assert result.mismatch is None
    supervised = [i for i, label in zip(result.input_ids.tolist(), result.labels.tolist()) if label != IGNORE_INDEX]
    eos = tok.eos_token_id
    assert supervised == tok.sp_model.encode("A red circle.") + [eos] + tok.sp_model.encode("On the mat.") + [eos]


def test_a_mismatch_is_still_reported(tmp_path):
    tok = tokenizer_with(tmp_path, None)
    turns = [{"from": "human", "value": "Hi</s>there"}, {"from": "gpt", "value": "Hello"}]
    result = preprocess("v1", turns, tok, False, 2048)  # a "</s>" in the question breaks the round split
    assert result.mismatch is not None and all(label == IGNORE_INDEX for label in result.labels.tolist())
