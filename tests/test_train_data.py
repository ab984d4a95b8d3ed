"""Training data: bad samples name file and id, skipping reports, collator and modality-grouped sampler."""
import json

import pytest
import torch

from mobilevlm.constants import IGNORE_INDEX
from mobilevlm.errors import DataError
from mobilevlm.processing import build_image_processor
from mobilevlm.testing import write_tiny_tokenizer
from mobilevlm.tokenizer import load_tokenizer
from mobilevlm.train.collator import SupervisedCollator, modality_length_grouped_indices
from mobilevlm.train.data import LazySupervisedDataset


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok")
    write_tiny_tokenizer(path)
    return load_tokenizer(path)


@pytest.fixture
def folder(tmp_path):
    from PIL import Image

    (tmp_path / "img").mkdir()
    Image.new("RGB", (64, 48), (200, 10, 10)).save(tmp_path / "img" / "a.png")
    (tmp_path / "img" / "broken.png").write_bytes(b"not a png")
    return tmp_path


def good(i, image=True):
    human = "What colour?\n<image>" if image else "Hello world!"
    sample = {"id": f"s{i}", "conversations": [{"from": "human", "value": human}, {"from": "gpt", "value": "red"}]}
    if image:
        sample["image"] = "a.png"
    return sample


def dataset(folder, tok, records, version="v1", jsonl=True, **kw):
    path = folder / ("data.jsonl" if jsonl else "data.json")
    if jsonl:
        path.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in records) + "\n")
    else:
        path.write_text(json.dumps(records))
    return LazySupervisedDataset(path, tok, version, 256, image_folder=folder / "img",
                                 image_processor=build_image_processor(96), **kw)


BAD = [
    ({**good(7), "image": "missing.png"}, "missing image file"),
    ({"id": "s7", "conversations": [{"from": "human", "value": "a"}, {"from": "human", "value": "b"}]}, "wrong role order"),
    ({"id": "s7", "conversations": "nope"}, "no `conversations`"),
    ({"id": "s7", "image": "a.png", "conversations": [{"from": "human", "value": "no tag"}, {"from": "gpt", "value": "x"}]},
     "no <image> tag"),
    ({"id": "s7", "image": "a.png", "conversations": [
        {"from": "human", "value": "<image>\nq1"}, {"from": "gpt", "value": "x"},
        {"from": "human", "value": "<image>\nq2"}, {"from": "gpt", "value": "y"}]}, "appears in 2 turns"),
]


@pytest.mark.parametrize("record,reason", BAD)
def test_bad_sample_names_file_and_id(folder, tok, record, reason):
    with pytest.raises(DataError) as err:
        dataset(folder, tok, [good(1), record])
    assert "data.jsonl" in str(err.value) and "'s7'" in str(err.value) and reason in str(err.value)


def test_plain_sample_needs_image_in_first_turn(folder, tok):
    record = {"id": "p1", "conversations": [{"from": "human", "value": "hi"}, {"from": "gpt", "value": "x"}]}
    with pytest.raises(DataError, match=r"'p1'.*plain"):
        dataset(folder, tok, [good(1), record], version="plain")


def test_unreadable_json_line(folder, tok):
    with pytest.raises(DataError, match=r"data.jsonl: sample 'line 2' \(line 2\): unreadable JSON"):
        dataset(folder, tok, [good(1), "{not json"])


def test_invalid_json_list(folder, tok):
    (folder / "data.json").write_text('[{"id": 1},')
    with pytest.raises(DataError, match="data.json: invalid JSON"):
        LazySupervisedDataset(folder / "data.json", tok, "v1", 256)


def test_skip_bad_samples_reports_them(folder, tok):
    ds = dataset(folder, tok, [good(1), BAD[0][0], "{oops", good(2, image=False), {**good(3), "image": "broken.png"}],
                 skip_bad_samples=True)
    assert len(ds) == 3 and ds.report.total == 5
    assert {s.sample_id for s in ds.report.skipped} == {"s7", "line 3"}
    item = ds[2]  # the corrupt image is only found when decoded: skipped then, reported, next sample used
    assert item["sample_id"] == "s1"
    assert ds.report.skipped[-1].sample_id == "s3" and "broken.png" in ds.report.skipped[-1].reason
    assert "skipped 3 of 5" in ds.report.summary()
    assert ds[2]["sample_id"] == "s1" and len(ds.report.skipped) == 3  # reported once, not once per epoch


def test_a_long_run_of_corrupt_images_is_skipped_without_recursion(folder, tok):
    import sys

    records = [{**good(i), "image": "broken.png"} for i in range(sys.getrecursionlimit() + 10)] + [good(99999)]
    ds = dataset(folder, tok, records, skip_bad_samples=True)
    assert ds[0]["sample_id"] == "s99999"


def test_corrupt_image_without_skip_is_an_error(folder, tok):
    ds = dataset(folder, tok, [{**good(3), "image": "broken.png"}], jsonl=False)
    with pytest.raises(DataError, match=r"data.json: sample 's3'"):
        ds[0]


def test_items_and_collator(folder, tok):
    ds = dataset(folder, tok, [good(1), good(2, image=False)])
    a, b = ds[0], ds[1]
    assert a["image"].shape == (3, 96, 96) and b["image"].abs().sum() == 0  # text-only: a blank image slot
    batch = SupervisedCollator(tok.pad_token_id, model_max_length=10)([a, b])
    assert batch["input_ids"].shape == (2, 10) and batch["images"].shape == (2, 3, 96, 96)
    assert batch["sample_ids"] == ["s1", "s2"]
    short = len(b["input_ids"])
    if short < 10:
        assert (batch["labels"][1, short:] == IGNORE_INDEX).all()
        assert not batch["attention_mask"][1, short:].any()


def test_modality_grouping_keeps_modalities_apart():
    lengths = [5, -3, 7, -2, 9, -8, 4, -6, 3, -1, 2, -4]  # 6 image, 6 text-only samples
    order = modality_length_grouped_indices(lengths, batch_size=2, world_size=1, generator=torch.Generator().manual_seed(0))
    assert sorted(order) == list(range(12))
    batches = [order[i:i + 2] for i in range(0, 10, 2)]  # all full mega-batches but the merged leftovers
    for batch in batches[:-1]:
        assert len({lengths[i] > 0 for i in batch}) == 1
    again = modality_length_grouped_indices(lengths, 2, 1, torch.Generator().manual_seed(0))
    assert again == order


def test_group_by_length_uses_the_datasets_word_counts_without_loading_samples():
    from types import SimpleNamespace

    from transformers.trainer_pt_utils import LengthGroupedSampler

    from mobilevlm.train.trainer import VLMTrainer

    class Lengths(torch.utils.data.Dataset):
        modality_lengths = [(-1) ** i * (1 + (i * 37) % 200) for i in range(400)]  # text-only samples negative

        def __len__(self):
            return len(self.modality_lengths)

        def __getitem__(self, i):
            raise AssertionError("the sampler must not load a sample to learn its length")

    args = SimpleNamespace(group_by_modality_length=False, train_sampling_strategy="group_by_length",
                           train_batch_size=8, gradient_accumulation_steps=1)
    torch.manual_seed(0)
    sampler = VLMTrainer._get_train_sampler(SimpleNamespace(args=args), Lengths())
    assert isinstance(sampler, LengthGroupedSampler)
    order = list(sampler)
    assert sorted(order) == list(range(400))
    lengths = [abs(n) for n in Lengths.modality_lengths]

    def padding(indices):
        batches = [indices[i:i + 8] for i in range(0, len(indices), 8)]
        return sum(max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches)

    assert padding(order) < 0.2 * padding(torch.randperm(400).tolist())
