"""LLaVA-format training data: a JSON list or JSONL of `{id, image?, conversations: [{from, value}, ...]}`.

Records are read and checked up front (structure, roles, `<image>` tags, that image files exist), because a
run that dies hours in on sample 812,345 is the worst way to learn the data is bad; tokenization and image
decoding happen lazily in `__getitem__`. Every problem names the file and the sample id. With
`skip_bad_samples` the bad samples are left out instead, and `report()` says how many and why.
"""
from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils.data import Dataset

from mobilevlm.constants import DEFAULT_IMAGE_TOKEN
from mobilevlm.errors import DataError, ImageError
from mobilevlm.train.preprocess import ROLE_INDEX, preprocess

logger = logging.getLogger(__name__)


@dataclass
class BadSample:
    sample_id: str
    reason: str


@dataclass
class DataReport:
    """What was left out of a data file, and why."""

    path: str
    total: int = 0
    skipped: list[BadSample] = field(default_factory=list)

    def summary(self) -> str:
        if not self.skipped:
            return f"{self.path}: {self.total} samples, none skipped"
        reasons = Counter(s.reason.split(":")[0] for s in self.skipped)
        listing = "; ".join(f"{n} x {r}" for r, n in reasons.most_common())
        return f"{self.path}: skipped {len(self.skipped)} of {self.total} samples ({listing})"

    def to_dict(self) -> dict:
        return {"path": self.path, "total": self.total,
                "skipped": [{"id": s.sample_id, "reason": s.reason} for s in self.skipped]}


def read_records(path: Path) -> list[tuple[str, object]]:
    """(where, record) pairs; `where` is "line N" for JSONL and "item N" for a JSON list."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise DataError(f"{path}: cannot read data file ({err.strerror or err})") from None
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text ({err})") from None
    if text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
        return [(f"item {i}", item) for i, item in enumerate(items)]
    records = []
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            records.append((f"line {number}", json.loads(line)))
        except json.JSONDecodeError as err:
            records.append((f"line {number}", DataError(f"unreadable JSON line ({err.msg})")))
    return records


def check_record(record, version: str, image_folder: Path | None) -> list[dict]:
    """The sample's turns (leading gpt turn dropped) if it is well-formed; ValueError saying what is wrong."""
    if isinstance(record, DataError):
        raise ValueError(str(record))
    if not isinstance(record, dict):
        raise ValueError(f"a sample must be a JSON object, not {type(record).__name__}")
    turns = record.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise ValueError("no `conversations` list")
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ROLE_INDEX or not isinstance(turn.get("value"), str):
            raise ValueError(f"malformed turn {i}: needs `from` (human or gpt) and a string `value`")
    if turns[0]["from"] != "human":
        turns = turns[1:]  # the original drops a leading gpt turn
    for i, turn in enumerate(turns):
        if turn["from"] != ("human", "gpt")[i % 2]:
            raise ValueError(f"wrong role order: turn {i} is from {turn['from']!r}; turns must alternate human / gpt")
    if not turns:
        raise ValueError("no human turn")
    has_tag = any(DEFAULT_IMAGE_TOKEN in t["value"] for t in turns)
    if "image" in record:
        if image_folder is None:
            raise ValueError("the sample has an image but no --image_folder was given")
        if not has_tag:
            raise ValueError("the sample has an image but no <image> tag in its conversation")
        tagged_turns = sum(DEFAULT_IMAGE_TOKEN in t["value"] for t in turns)
        if version != "plain" and tagged_turns > 1:  # each tagged turn becomes one placeholder, for one image
            raise ValueError(f"<image> appears in {tagged_turns} turns but the sample has one image")
        if not (image_folder / str(record["image"])).is_file():
            raise ValueError(f"missing image file {image_folder / str(record['image'])}")
    elif has_tag:
        raise ValueError("<image> tag in a sample without an `image`")
    if version == "plain" and (len(turns) != 2 or DEFAULT_IMAGE_TOKEN not in turns[0]["value"]):
        raise ValueError("a `plain` (pre-training) sample needs 2 turns with <image> in the first")
    return turns


class LazySupervisedDataset(Dataset):
    """Items: input_ids, labels, image ([3,H,W], zeros for text-only samples of a multimodal model),
    sample_id, mismatch (None or why the label mask did not line up)."""

    def __init__(self, data_path, tokenizer, version: str, model_max_length: int, image_folder=None,
                 image_processor=None, image_aspect_ratio: str = "square", skip_bad_samples: bool = False,
                 records: list | None = None):
        self.path = Path(data_path)
        self.tokenizer = tokenizer
        self.version = version
        self.model_max_length = model_max_length
        self.image_folder = Path(image_folder) if image_folder else None
        self.image_processor = image_processor
        self.image_aspect_ratio = image_aspect_ratio
        self.skip_bad_samples = skip_bad_samples
        self.report = DataReport(str(self.path))
        self.samples: list[dict] = []
        for where, record in records if records is not None else read_records(self.path):
            sample_id = str(record.get("id", where)) if isinstance(record, dict) else where
            try:
                turns = check_record(record, version, self.image_folder)
                if image_processor is None and "image" in record:
                    raise ValueError("the sample has an image but the model has no vision tower (--vision_tower)")
            except ValueError as err:
                self._bad(sample_id, where, str(err))
                continue
            self.samples.append({"id": sample_id, "where": where, "image": record.get("image"), "turns": turns})
        self.report.total = len(self.samples) + len(self.report.skipped)
        if not self.samples:
            raise DataError(f"{self.path}: no usable samples ({self.report.summary()})")

    def _bad(self, sample_id: str, where: str, reason: str) -> None:
        if not self.skip_bad_samples:
            raise DataError(f"{self.path}: sample {sample_id!r} ({where}): {reason}")
        logger.warning("%s: skipping sample %r (%s): %s", self.path, sample_id, where, reason)
        self.report.skipped.append(BadSample(sample_id, reason))

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def modality_lengths(self) -> list[int]:
        """Word counts, negative for text-only samples (the `group_by_modality_length` sampler's input)."""
        lengths = []
        for sample in self.samples:
            words = sum(len(t["value"].split()) for t in sample["turns"])
            lengths.append(words if sample["image"] is not None else -words)
        return lengths

    def _image(self, sample: dict) -> torch.Tensor:
        from mobilevlm.processing import load_image, process_images

        image = load_image(self.image_folder / sample["image"])
        return process_images([image], self.image_processor, self.image_aspect_ratio)[0]

    def _blank_image(self) -> torch.Tensor:
        size = self.image_processor.crop_size
        return torch.zeros(3, size["height"], size["width"])

    def __getitem__(self, index: int) -> dict:
        # Decoding is lazy, so a corrupt image is only found here: with skip_bad_samples, report it (once) and
        # use the next sample whose image reads.
        for offset in range(len(self)):
            item = self._item((index + offset) % len(self))
            if item is not None:
                return item
        raise DataError(f"{self.path}: no sample has a readable image")

    def _item(self, index: int) -> dict | None:
        sample = self.samples[index]
        image = None
        if sample["image"] is not None:
            try:
                image = self._image(sample)
            except ImageError as err:
                if not self.skip_bad_samples:
                    raise DataError(f"{self.path}: sample {sample['id']!r} ({sample['where']}): {err}") from None
                if sample["id"] not in {bad.sample_id for bad in self.report.skipped}:
                    self.report.skipped.append(BadSample(sample["id"], f"unreadable image: {err}"))
                    logger.warning("%s: skipping sample %r: %s", self.path, sample["id"], err)
                return None
        try:
            tokens = preprocess(self.version, sample["turns"], self.tokenizer, image is not None, self.model_max_length)
        except ValueError as err:
            raise DataError(f"{self.path}: sample {sample['id']!r} ({sample['where']}): {err}") from None
        if image is None and self.image_processor is not None:
            image = self._blank_image()  # the original's one-image-slot-per-sample batch layout
        return {"input_ids": tokens.input_ids, "labels": tokens.labels, "image": image,
                "sample_id": sample["id"], "mismatch": tokens.mismatch}

    def split(self, eval_fraction: float, seed: int = 0) -> tuple["LazySupervisedDataset", "LazySupervisedDataset | None"]:
        """A (train, eval) split of the samples, shuffled with `seed` (MobileLLaMA SFT held out 2%)."""
        if eval_fraction <= 0:
            return self, None
        order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        n_eval = max(1, int(len(order) * eval_fraction))
        return self._subset(order[n_eval:]), self._subset(order[:n_eval])

    def _subset(self, indices: list[int]) -> "LazySupervisedDataset":
        subset = object.__new__(LazySupervisedDataset)
        subset.__dict__.update(self.__dict__)
        subset.samples = [self.samples[i] for i in indices]
        return subset
