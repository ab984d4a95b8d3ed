"""Question readers: a `benchmark_data/` folder -> the items to generate answers for, in file order.

Each item carries the user text exactly as the original generators build it (suffixes included, the
`<image>` tag left to the template), the `prompt` its answer line records, and how to open its image.
Images are opened like the original, `Image.open(...).convert("RGB")`, never EXIF-rotated. (Its MMBench
and ScienceQA scripts leave the conversion to the CLIP processor, which in transformers 4.33 is the same
`convert("RGB")`.)
"""
from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from mobilevlm.constants import DEFAULT_IMAGE_TOKEN
from mobilevlm.errors import DataError, ImageError
from mobilevlm.eval import mmbench
from mobilevlm.eval.records import read_json, read_jsonl
from mobilevlm.processing import load_image

OPTION_LETTER_SUFFIX = "Answer with the option's letter from the given choices directly."
OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"

# benchmark -> (question file, image folder) for the four that use the original `model_vqa_loader`.
LOADER_LAYOUT = {
    "gqa": ("llava_gqa_testdev_balanced.jsonl", "images"),
    "mme": ("llava_mme.jsonl", "images"),
    "pope": ("llava_pope_test.jsonl", "val2014"),
    "textvqa": ("llava_textvqa_val_v051_ocr.jsonl", "train_images"),
}
MAX_NEW_TOKENS = {"gqa": 128, "mme": 128, "pope": 128, "textvqa": 128, "mmbench": 1024, "sqa": 1024}


@dataclass
class Item:
    question_id: Any
    question: str                      # user text after the "<image>\n" tag
    prompt: str                        # the answer line's "prompt"
    open_image: Callable[[], Any] | None = None
    pad: bool = True                   # False: the raw CLIP processor (ScienceQA), no padding to a square
    extra: dict = field(default_factory=dict)  # more answer-line fields (MMBench)

    @property
    def key(self) -> tuple[str, str]:
        """Identifies the item within its benchmark (ids alone repeat in MME and TextVQA)."""
        return str(self.question_id), self.prompt


def open_image(source: Path | bytes, name: str):
    """As the original opens benchmark images: no EXIF rotation, PIL's RGB conversion (unlike photos)."""
    return load_image(source, name=name, exif=False)


def _file_image(path: Path) -> Callable[[], Any]:
    return lambda: open_image(path, str(path))


def loader_items(benchmark: str, data_dir: Path) -> list[Item]:
    question_name, image_folder = LOADER_LAYOUT[benchmark]
    folder = Path(data_dir) / benchmark
    rows = read_jsonl(folder / question_name, required=("question_id", "image", "text"))
    return [Item(row["question_id"], row["text"], row["text"], _file_image(folder / image_folder / row["image"]))
            for row in rows]


def _decode_base64(value, name: str) -> bytes:
    try:
        return base64.b64decode(str(value), validate=True)
    except (binascii.Error, ValueError) as err:
        raise ImageError(f"{name}: the 'image' cell is not base64 ({err})") from None


def mmbench_items(data_dir: Path) -> list[Item]:
    path = Path(data_dir) / "mmbench" / mmbench.TSV_FILE
    items = []
    for row in mmbench.read_tsv(path):
        if row.get("image") is None:
            raise DataError(f"{path}:{row['_line']}: no 'image'")
        options = mmbench.options_of(row)
        letters = list(OPTION_LETTERS[: len(options)])
        question = str(row["question"])
        if not mmbench.is_missing(row.get("hint")):
            question = f"{row['hint']}\n{question}"
        for letter, option in zip(letters, options):
            question += f"\n{letter}. {option}"
        name = f"{path}:{row['_line']} (index {row['index']})"
        data = row["image"]
        items.append(Item(
            row["index"], f"{question}\n{OPTION_LETTER_SUFFIX}", question,
            lambda data=data, name=name: open_image(_decode_base64(data, name), name),
            extra={"round_id": 0, "options": options, "option_char": letters},
        ))
    return items


def sqa_items(data_dir: Path) -> list[Item]:
    folder = Path(data_dir) / "sqa"
    path = folder / "llava_test_CQM-A.json"
    entries = read_json(path)
    if not isinstance(entries, list):
        raise DataError(f"{path}: expected a JSON array of problems")
    items = []
    for position, entry in enumerate(entries):
        try:
            text = entry["conversations"][0]["value"]
            pid = entry["id"]
        except (KeyError, IndexError, TypeError):
            raise DataError(f"{path}: entry {position} lacks 'id' or conversations[0].value") from None
        question = text.replace(DEFAULT_IMAGE_TOKEN, "").strip()
        if entry.get("image"):
            image = _file_image(folder / "images" / "test" / entry["image"])
            items.append(Item(pid, f"{question}\n{OPTION_LETTER_SUFFIX}",
                              f"{DEFAULT_IMAGE_TOKEN}\n{question}\n{OPTION_LETTER_SUFFIX}", image, pad=False))
        else:
            items.append(Item(pid, f"{question}\n{OPTION_LETTER_SUFFIX}", f"{question}\n{OPTION_LETTER_SUFFIX}"))
    return items


def read_items(benchmark: str, data_dir: Path) -> list[Item]:
    if benchmark in LOADER_LAYOUT:
        return loader_items(benchmark, data_dir)
    if benchmark == "mmbench":
        return mmbench_items(data_dir)
    if benchmark == "sqa":
        return sqa_items(data_dir)
    raise DataError(f"unknown benchmark {benchmark!r}")
