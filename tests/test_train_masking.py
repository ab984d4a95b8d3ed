"""Label masks of the training templates, checked token by token with a real SentencePiece model."""
import pytest
import torch

from mobilevlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mobilevlm.conversation import VICUNA_V1_SYSTEM
from mobilevlm.testing import write_tiny_tokenizer
from mobilevlm.tokenizer import load_tokenizer
from mobilevlm.train.preprocess import move_image_tag_first, preprocess


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return load_tokenizer(path)


def pieces(tok, text):
    """SentencePiece ids of `text` alone (dummy prefix, no BOS)."""
    return tok.sp_model.encode(text)


def supervised(result):
    return [i for i, label in zip(result.input_ids.tolist(), result.labels.tolist()) if label != IGNORE_INDEX]


def turns(*values):
    return [{"from": ("human", "gpt")[i % 2], "value": v} for i, v in enumerate(values)]


def test_plain_keeps_caption_and_newline_masks_bos_and_image(tok):
    result = preprocess("plain", turns("Describe this.\n<image>", "A red circle."), tok, True, 2048)
    ids = result.input_ids.tolist()
    # The human text is discarded: [BOS, image, caption..., newline]
    assert ids[:2] == [tok.bos_token_id, IMAGE_TOKEN_INDEX]
    assert ids[2:] == pieces(tok, "A red circle.\n")
    assert result.labels.tolist()[:2] == [IGNORE_INDEX, IGNORE_INDEX]
    assert result.labels.tolist()[2:] == ids[2:]
    assert tok.eos_token_id not in ids
    assert result.mismatch is None


def test_v1_two_rounds_supervise_answers_and_eos_only(tok):
    sample = turns("What is in the image?\n<image>", "A red circle.", "Where is the cat?", "The cat is on the mat.")
    result = preprocess("v1", sample, tok, True, 2048)
    eos = tok.eos_token_id
    assert supervised(result) == pieces(tok, "A red circle.") + [eos] + pieces(tok, "The cat is on the mat.") + [eos]
    ids, labels = result.input_ids.tolist(), result.labels.tolist()
    # the supervised tokens are exactly the ones after each " ASSISTANT:" cue, up to and including </s>
    first = ids.index(eos)
    answer = pieces(tok, "A red circle.")
    assert ids[first - len(answer): first] == answer
    assert all(label == IGNORE_INDEX for label in labels[: first - len(answer)])
    assert labels[-1] == eos and result.mismatch is None
    # the image tag was moved to the front of its turn, as the original's preprocess_multimodal does
    assert ids.count(IMAGE_TOKEN_INDEX) == 1
    prefix = tok(VICUNA_V1_SYSTEM + " USER: ").input_ids
    assert ids[: len(prefix)] == prefix and ids[len(prefix)] == IMAGE_TOKEN_INDEX


def test_v1_text_only_sample(tok):
    result = preprocess("v1", turns("Hello world!", "How are you today?"), tok, False, 2048)
    assert supervised(result) == pieces(tok, "How are you today?") + [tok.eos_token_id]
    assert IMAGE_TOKEN_INDEX not in result.input_ids.tolist()


def test_llama_2_supervises_answer_with_its_space(tok):
    sample = turns("<image>\nWhat is this?", "A red circle.", "And now?", "The cat.")
    result = preprocess("llava_llama_2", sample, tok, True, 2048)
    eos = tok.eos_token_id
    assert supervised(result) == pieces(tok, "A red circle. ") + [eos] + pieces(tok, "The cat. ") + [eos]
    assert result.mismatch is None


def test_empty_answer_is_a_reported_mismatch_not_silent(tok):
    result = preprocess("v1", turns("Hello world!", ""), tok, False, 2048)
    assert result.mismatch is not None
    assert (result.labels == IGNORE_INDEX).all()


def span(ids, part):
    """The positions of `part` as a contiguous run in `ids`."""
    for start in range(len(ids) - len(part) + 1):
        if ids[start: start + len(part)] == part:
            return range(start, start + len(part))
    raise AssertionError(f"{part} is not in {ids}")


def test_v0_masks_human_turns_after_the_cue(tok):
    sample = turns("Hello world!", "Fine.", "Where is the cat?", "The cat is on the mat.")
    result = preprocess("v0", sample, tok, False, 2048)
    ids, labels = result.input_ids.tolist(), result.labels.tolist()
    for human in ("Hello world!", "Where is the cat?"):
        assert all(labels[i] == IGNORE_INDEX for i in span(ids, pieces(tok, human))), human
    for answer in ("Fine.", "The cat is on the mat."):
        assert all(labels[i] == ids[i] for i in span(ids, pieces(tok, answer))), answer
    system = pieces(tok, "A chat between a curious human")
    assert all(labels[i] == IGNORE_INDEX for i in span(ids, system))


def test_move_image_tag_first():
    assert move_image_tag_first(turns(" What?  <image> "))[0]["value"] == "<image>\nWhat?"


def test_unknown_version(tok):
    with pytest.raises(ValueError, match="unknown --version"):
        preprocess("nope", turns("a", "b"), tok, False, 2048)


def test_text_only_truncated_to_max_length(tok):
    result = preprocess("v1", turns("Hello world! " * 50, "Fine."), tok, False, 32)
    assert len(result.input_ids) == 32 and result.mismatch is None
    assert isinstance(result.labels, torch.Tensor)
