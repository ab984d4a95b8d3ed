"""Training-sample tokenization and label masking, per template, as the original `train.py` computes it.

Each function takes one sample's turns (`[{"from": "human"|"gpt", "value": ...}, ...]`, leading gpt turn
already dropped) and returns a `Tokenized` with `input_ids` and `labels` (IGNORE_INDEX where no loss is taken).
The masks are counted round by round with the legacy slow-tokenizer semantics (`MobileLlamaTokenizer`), which
is what makes them line up with the tokens. When they do not (the original's "tokenization mismatch"), the
sample's labels are all IGNORE_INDEX as in the original, but `mismatch` says so: the dataset counts and reports
these samples instead of letting them pass silently.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from mobilevlm.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX
from mobilevlm.conversation import Conversation, SeparatorStyle, get_conv_template
from mobilevlm.processing import tokenizer_image_token

ROLE_INDEX = {"human": 0, "gpt": 1}

# ChatML-style template of the original's `preprocess_mpt` (defined there but not registered by name).
CONV_MPT = Conversation(
    system="<|im_start|>system\nA conversation between a user and an LLM-based AI assistant. "
    "The assistant gives helpful and honest answers.",
    roles=("<|im_start|>user\n", "<|im_start|>assistant\n"), version="mpt", messages=[], offset=0,
    sep_style=SeparatorStyle.MPT, sep="<|im_end|>",
)


@dataclass
class Tokenized:
    input_ids: torch.Tensor
    labels: torch.Tensor
    mismatch: str | None = None  # why the mask does not line up with the tokens, if it does not


def move_image_tag_first(turns: list[dict]) -> list[dict]:
    """`preprocess_multimodal`: a turn mentioning `<image>` becomes "<image>\\n" + its (stripped) text."""
    out = []
    for turn in turns:
        value = turn["value"]
        if DEFAULT_IMAGE_TOKEN in value:
            value = DEFAULT_IMAGE_TOKEN + "\n" + value.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        out.append({**turn, "value": value})
    return out


def _encode(text: str, tokenizer, has_image: bool) -> list[int]:
    return tokenizer_image_token(text, tokenizer) if has_image else tokenizer(text).input_ids


def _encode_prompt(prompt: str, tokenizer, has_image: bool, max_length: int) -> torch.Tensor:
    # Text-only prompts are truncated here as in the original; image prompts only by the collator.
    if has_image:
        return torch.tensor(tokenizer_image_token(prompt, tokenizer), dtype=torch.long)
    ids = tokenizer(prompt, max_length=max_length, truncation=True).input_ids
    return torch.tensor(ids, dtype=torch.long)


def _prompt(template: Conversation, turns: list[dict]) -> str:
    conv = template.copy()
    conv.messages = []
    for i, turn in enumerate(turns):
        role = conv.roles[ROLE_INDEX[turn["from"]]]
        if role != conv.roles[i % 2]:
            raise ValueError(f"turn {i} is from {turn['from']!r}: turns must alternate human / gpt")
        conv.append_message(role, turn["value"])
    return conv.get_prompt()


def _check_length(labels: torch.Tensor, cursor: int, total: int, max_length: int) -> str | None:
    if cursor < max_length and cursor != total:
        labels[:] = IGNORE_INDEX
        return f"label mask covers {cursor} tokens but the sample has {total}"
    return None


def preprocess_plain(turns: list[dict], tokenizer, has_image: bool = True, max_length: int = 2048) -> Tokenized:
    """Stage I: "<image>" + caption + "\\n"; the instruction text is discarded, BOS and image are not supervised."""
    if len(turns) != 2 or DEFAULT_IMAGE_TOKEN not in turns[0]["value"]:
        raise ValueError("a `plain` sample needs exactly 2 turns and <image> in the first")
    text = DEFAULT_IMAGE_TOKEN + turns[1]["value"] + get_conv_template("plain").sep
    ids = torch.tensor(tokenizer_image_token(text, tokenizer), dtype=torch.long)
    labels = ids.clone()
    labels[: len(tokenizer_image_token(DEFAULT_IMAGE_TOKEN, tokenizer))] = IGNORE_INDEX
    return Tokenized(ids, labels)


def _preprocess_rounds(template: Conversation, sep: str, turns, tokenizer, has_image, max_length) -> Tokenized:
    """v1 / llama_2: rounds split on sep2; in each, everything up to `sep` (the assistant cue) is masked.

    A round's length is counted with its BOS standing in for the "</s>" it was split on; the instruction length
    drops BOS and the lone "▁" of the cue's trailing space (hence the -2, as in the original). Later rounds are
    counted as they are tokenized after that "</s>" (its id in place of BOS): the same numbers for a legacy
    tokenizer, and still exact for a non-legacy one, where the original's count is one off and zeroes the sample.
    """
    prompt = _prompt(template, turns)
    ids = _encode_prompt(prompt, tokenizer, has_image, max_length)
    labels = ids.clone()
    # the sample is not padded here: every id counts (the original's `ne(pad)` also drops a genuine <unk>, which a
    # non-legacy tokenizer produces after "</s>" when the unprefixed piece is not in the vocabulary)
    total = len(ids)
    cursor = 1
    labels[:cursor] = IGNORE_INDEX
    for index, rnd in enumerate(prompt.split(template.sep2)):
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        after, extra = (template.sep2, 1) if index else ("", 0)  # a later round is counted after its "</s>"
        round_len = len(_encode(after + rnd, tokenizer, has_image)) - extra
        instruction_len = len(_encode(after + parts[0] + sep, tokenizer, has_image)) - 2 - extra
        labels[cursor: cursor + instruction_len] = IGNORE_INDEX
        cursor += round_len
    labels[cursor:] = IGNORE_INDEX
    return Tokenized(ids, labels, _check_length(labels, cursor, total, max_length))


def preprocess_v1(turns, tokenizer, has_image=False, max_length=2048, template: str = "v1") -> Tokenized:
    conv = get_conv_template(template)
    return _preprocess_rounds(conv, conv.sep + conv.roles[1] + ": ", turns, tokenizer, has_image, max_length)


def preprocess_llama_2(turns, tokenizer, has_image=False, max_length=2048, template: str = "llava_llama_2") -> Tokenized:
    return _preprocess_rounds(get_conv_template(template), "[/INST] ", turns, tokenizer, has_image, max_length)


def preprocess_mpt(turns, tokenizer, has_image=False, max_length=2048) -> Tokenized:
    """ChatML rounds: the first is system + user + assistant, later ones user + assistant; no BOS offset."""
    conv = CONV_MPT
    prompt = _prompt(conv, turns)
    ids = _encode_prompt(prompt, tokenizer, has_image, max_length)
    labels = ids.clone()
    total = int(ids.ne(tokenizer.pad_token_id).sum())
    sep = conv.sep + conv.roles[1]
    pieces = prompt.split(conv.sep)
    rounds = [conv.sep.join(pieces[:3])] + [conv.sep.join(pieces[i:i + 2]) for i in range(3, len(pieces), 2)]
    cursor = 0
    sep_len = len(_encode(conv.sep, tokenizer, has_image))
    for rnd in rounds:
        if rnd == "":
            break
        parts = rnd.split(sep)
        if len(parts) != 2:
            break
        round_len = len(_encode(rnd, tokenizer, has_image)) + sep_len
        instruction_len = len(_encode(parts[0] + sep, tokenizer, has_image))
        labels[cursor: cursor + instruction_len] = IGNORE_INDEX
        cursor += round_len
    labels[cursor:] = IGNORE_INDEX
    return Tokenized(ids, labels, _check_length(labels, cursor, total, max_length))


def preprocess_v0(turns, tokenizer, has_image=False, max_length=2048) -> Tokenized:
    """The original's fallback: "### Role: text\\n" per turn after a system header; human turns are masked
    from their third token on (the "###" cue stays supervised, as in the original). No mismatch check exists."""
    conv = get_conv_template("v0")
    header = f"{conv.system}\n\n"
    segments = [f"### {conv.roles[ROLE_INDEX[t['from']]]}: {t['value']}\n" for t in turns]
    prompt = header + "".join(segments) + "### "
    ids = _encode_prompt(prompt, tokenizer, has_image, max_length)
    labels = ids.clone()
    lengths = [min(len(_encode(s, tokenizer, has_image)), max_length) for s in [header] + segments]
    cursor = lengths[0]
    labels[:cursor] = IGNORE_INDEX
    for length, turn in zip(lengths[1:], turns):
        if turn["from"] == "human":
            labels[cursor + 2: cursor + length] = IGNORE_INDEX
        cursor += length
    return Tokenized(ids, labels)


PREPROCESSORS = {
    "plain": preprocess_plain,
    "v1": preprocess_v1,
    "vicuna_v1": preprocess_v1,
    "llama_2": lambda *a, **k: preprocess_llama_2(*a, template="llama_2", **k),
    "llava_llama_2": preprocess_llama_2,
    "mpt": preprocess_mpt,
    "v0": preprocess_v0,
    "default": preprocess_v0,
}


def preprocess(version: str, turns: list[dict], tokenizer, has_image: bool, max_length: int) -> Tokenized:
    """Tokenize and mask one sample with the template named by `--version`."""
    if version not in PREPROCESSORS:
        raise ValueError(f"unknown --version {version!r}; known: {', '.join(PREPROCESSORS)}")
    if has_image:
        turns = move_image_tag_first(turns)
    return PREPROCESSORS[version](turns, tokenizer, has_image=has_image, max_length=max_length)
