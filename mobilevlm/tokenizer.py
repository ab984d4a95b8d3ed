"""The LLaMA SentencePiece tokenizer with the slow-tokenizer semantics of transformers 4.33 MobileVLM was trained with.

Why not transformers' own `LlamaTokenizer`: in transformers 5 it is a `tokenizers`-backed BPE conversion whose
handling of leading spaces differs from the legacy slow tokenizer (" x" loses a space), and the original
training-label masking counts tokens round by round with the legacy rules. Here every piece of text between
special tokens is encoded by SentencePiece itself (dummy prefix included), exactly as transformers 4.33's
`LlamaTokenizer(legacy=True)` did, which is what `tokenizer_image_token` and the label masking rely on. A
checkpoint whose tokenizer_config.json says `"legacy": false` gets 4.33's non-legacy rules instead.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

SPIECE_UNDERLINE = "\u2581"


class MobileLlamaTokenizer(SentencePieceBackend):
    vocab_files_names = {"vocab_file": "tokenizer.model"}
    model_input_names = ["input_ids", "attention_mask"]

    def __init__(
        self,
        vocab_file: str,
        unk_token: str = "<unk>",
        bos_token: str = "<s>",
        eos_token: str = "</s>",
        pad_token: str | None = None,
        add_bos_token: bool = True,
        add_eos_token: bool = False,
        legacy: bool | None = None,
        **kwargs,
    ):
        # The mtgv tokenizer_config.json carries keys of the 4.33-era class; they mean nothing here.
        for stale in ("tokenizer_class", "auto_map", "sp_model_kwargs", "backend", "special_tokens_pattern"):
            kwargs.pop(stale, None)
        kwargs["clean_up_tokenization_spaces"] = False
        self.add_bos_token = add_bos_token
        self.add_eos_token = add_eos_token
        super().__init__(
            vocab_file=vocab_file,
            unk_token=unk_token,
            bos_token=bos_token,
            eos_token=eos_token,
            pad_token=pad_token,
            legacy=True,  # the backend keeps SentencePiece's dummy prefix, as the 4.33 slow tokenizer in both modes
            **kwargs,
        )
        # The checkpoint's `legacy` as transformers 4.33 read it: unset means legacy. Non-legacy only changes the
        # text right after a special token (e.g. "</s>USER:"), which then gets no dummy-prefix space.
        self.legacy = True if legacy is None else bool(legacy)
        self.init_kwargs["legacy"] = self.legacy

    def tokenize(self, text: str, **kwargs) -> list[str]:
        if not self.legacy:  # 4.33: only the text's own start carries the prefix; literal '▁' count as spaces
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
        return super().tokenize(text, **kwargs)

    def _tokenize(self, text: str, **kwargs) -> list[str]:
        """transformers 4.33's rule: a non-legacy piece of text that follows a special token loses the leading '▁'
        of its first piece (that piece may then not be in the vocabulary and become <unk>, as there)."""
        if self.legacy:
            return self.sp_model.encode(text, out_type=str)
        is_first = text.startswith(SPIECE_UNDERLINE)
        if is_first:
            text = text[1:]
        tokens = self.sp_model.encode(text, out_type=str)
        if not is_first and not text.startswith(" ") and tokens and tokens[0].startswith(SPIECE_UNDERLINE):
            tokens = ([tokens[0][1:]] if len(tokens[0]) > 1 else []) + tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        bos = [self.bos_token_id] if self.add_bos_token else []
        eos = [self.eos_token_id] if self.add_eos_token else []
        ids = bos + list(token_ids_0) + eos
        if token_ids_1 is not None:
            ids += bos + list(token_ids_1) + eos
        return ids

    def get_special_tokens_mask(self, token_ids_0, token_ids_1=None, already_has_special_tokens=False):
        if already_has_special_tokens:
            return [int(t in self.all_special_ids) for t in token_ids_0]
        bos = [1] if self.add_bos_token else []
        eos = [1] if self.add_eos_token else []
        mask = bos + [0] * len(token_ids_0) + eos
        if token_ids_1 is not None:
            mask += bos + [0] * len(token_ids_1) + eos
        return mask

    def num_special_tokens_to_add(self, pair: bool = False) -> int:
        per_sequence = int(self.add_bos_token) + int(self.add_eos_token)
        return per_sequence * (2 if pair else 1)

    def convert_tokens_to_string(self, tokens: list[str]) -> str:
        return self._join_pieces(tokens, skip_special_tokens=False)

    def _join_pieces(self, tokens: list[str], skip_special_tokens: bool) -> str:
        # SentencePiece decodes each run of ordinary pieces (so byte-fallback pieces become UTF-8 again and the
        # dummy-prefix space is dropped, as in the legacy tokenizer); special tokens are spliced in verbatim.
        specials = set(self.all_special_tokens)
        if skip_special_tokens:
            return self.sp_model.decode([t for t in tokens if t not in specials])
        text, run = "", []
        for token in tokens:
            if token in specials:
                text += self.sp_model.decode(run) + token
                run = []
            else:
                run.append(token)
        return text + self.sp_model.decode(run)

    def _decode(self, token_ids, skip_special_tokens=False, clean_up_tokenization_spaces=None, **kwargs) -> str:
        if isinstance(token_ids, int):
            token_ids = [token_ids]
        return self._join_pieces(self.convert_ids_to_tokens(list(token_ids)), skip_special_tokens)


def load_tokenizer(model_dir: str | os.PathLike) -> MobileLlamaTokenizer:
    """The tokenizer of a checkpoint directory (its `tokenizer.model`), pad = unk as in the original training."""
    from mobilevlm.errors import CheckpointError

    model_dir = Path(model_dir)
    if not (model_dir / "tokenizer.model").is_file():
        raise CheckpointError(f"{model_dir}: no tokenizer.model (the SentencePiece model of the checkpoint)")
    tokenizer = MobileLlamaTokenizer.from_pretrained(str(model_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.unk_token
    return tokenizer


def train_sentencepiece(lines: Iterable[str], vocab_size: int, out_path: str | os.PathLike, seed_sentences: int = 200_000) -> Path:
    """Train a LLaMA-style SentencePiece model (BPE, byte fallback, unk/bos/eos = 0/1/2, digits split) on `lines`.

    Writes `out_path` (a tokenizer.model file) and returns its path. Used by tests and the demo; the options are
    those of the LLaMA tokenizer so that the result behaves like the real one (dummy prefix, "\\n" as <0x0A>).
    """
    import io

    import sentencepiece as spm

    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(list(lines)),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        character_coverage=1.0,
        input_sentence_size=seed_sentences,
        shuffle_input_sentence=False,
        hard_vocab_limit=False,
        minloglevel=2,
        num_threads=1,
    )
    out_path.write_bytes(model.getvalue())
    return out_path


def save_tokenizer_files(model_dir: str | os.PathLike, sp_model_path: str | os.PathLike | None = None) -> None:
    """Write tokenizer_config.json / special_tokens_map.json next to a tokenizer.model, as the mtgv repos have."""
    import json
    import shutil

    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    if sp_model_path is not None and Path(sp_model_path).resolve() != (model_dir / "tokenizer.model").resolve():
        shutil.copyfile(sp_model_path, model_dir / "tokenizer.model")
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": "<unk>",
        "model_max_length": 2048,
        "padding_side": "right",
        "legacy": True,
        "clean_up_tokenization_spaces": False,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}
    (model_dir / "special_tokens_map.json").write_text(json.dumps(specials, indent=2) + "\n")
