"""Question readers (prompts exactly as the original generators build them, images opened like the
original) and the answer-file writer, with a stand-in pipeline that records what it is asked."""
import json

import pytest
from PIL import Image

from mobilevlm.errors import DataError, ImageError
from mobilevlm.eval.benchmarks import read_items
from mobilevlm.eval.generate import generate_answers
from mobilevlm.eval.sample_data import write_sample_benchmarks

SUFFIX = "\nAnswer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_sample_benchmarks(tmp_path_factory.mktemp("bench"))


def test_mmbench_prompt_hint_options_and_suffix(data):
    items = read_items("mmbench", data)
    # Options stop at the first empty column; the hint goes first; the suffix is not part of `prompt`.
    assert items[1].question == "Look at the centre.\nWhich shape is shown?\nA. square\nB. circle" + SUFFIX
    assert items[1].prompt == "Look at the centre.\nWhich shape is shown?\nA. square\nB. circle"
    assert items[1].extra == {"round_id": 0, "options": ["square", "circle"], "option_char": ["A", "B"]}
    assert [item.question_id for item in items] == [0, 1, 1000000, 2000000, 1000001]
    assert items[0].open_image().mode == "RGB" and items[0].pad


def test_sqa_prompts_and_raw_preprocessing(data):
    items = read_items("sqa", data)
    image_item, text_item = items[2], items[1]
    assert image_item.question == "Context: Look closely.\nWhich colour is the square?\nA. green\nB. red\nC. blue" + SUFFIX
    assert image_item.prompt == "<image>\n" + image_item.question
    assert not image_item.pad and image_item.open_image().size == (36, 36)
    assert text_item.open_image is None and text_item.prompt == text_item.question
    assert text_item.question.startswith("Context: Animals differ.\nWhich is a mammal?\nA. cat")


def test_loader_prompts_are_the_question_text(data):
    item = read_items("textvqa", data)[0]
    assert item.question == item.prompt == ("what does the sign say?\nReference OCR token: STOP\n"
                                            "Answer the question using a single word or phrase.")
    assert item.key == ("a1b2", item.prompt)


def test_loader_converts_to_rgb(tmp_path):
    pope = tmp_path / "pope"
    (pope / "val2014").mkdir(parents=True)
    Image.new("RGBA", (8, 6), (1, 2, 3, 4)).save(pope / "val2014" / "x.png")
    (pope / "llava_pope_test.jsonl").write_text(json.dumps({"question_id": 1, "image": "x.png", "text": "Q?", "category": "random"}) + "\n")
    assert read_items("pope", tmp_path)[0].open_image().mode == "RGB"
    (pope / "val2014" / "x.png").unlink()
    with pytest.raises(ImageError, match=r"val2014/x.png: cannot open image file \(No such file"):
        read_items("pope", tmp_path)[0].open_image()


def test_bad_mmbench_rows_are_named(tmp_path):
    tsv = tmp_path / "mmbench" / "mmbench_dev_en_20231003.tsv"
    tsv.parent.mkdir()
    tsv.write_text("index\tquestion\tA\tB\tanswer\timage\n0\tQ\tx\ty\tA\tnot*base64\n")
    with pytest.raises(DataError, match="missing column"):
        read_items("mmbench", tmp_path)
    tsv.write_text("index\tquestion\tA\tB\tC\tD\tanswer\timage\n0\tQ\tx\ty\t\t\tA\tnot*base64\n")
    with pytest.raises(ImageError, match=r"mmbench_dev_en_20231003.tsv:2 \(index 0\): the 'image' cell is not base64"):
        read_items("mmbench", tmp_path)[0].open_image()


class RecordingPipe:
    """Stands in for `Pipeline`: records prompts, image counts, settings and the aspect-ratio mode."""

    def __init__(self):
        self.image_aspect_ratio = "pad"
        self.calls = []

    def build_prompt(self, question, num_images=1, conv_mode=None):
        return "<image>\n" * num_images + question

    def generate_batch(self, requests, **settings):
        self.calls.append(([(p, len(i)) for p, i in requests], settings, self.image_aspect_ratio))
        return [f"answer {len(self.calls)}.{n}" for n in range(len(requests))]


def test_writer_batches_settings_and_format(data, tmp_path):
    pipe = RecordingPipe()
    items = read_items("sqa", data)
    assert generate_answers(pipe, "sqa", items, tmp_path / "a.jsonl", "my-model", batch_size=3) == 4
    (first, settings, aspect), (second, _, _) = pipe.calls
    assert [n for _, n in first] == [1, 0, 1] and [n for _, n in second] == [0]
    assert settings == {"temperature": 0, "top_p": None, "num_beams": 1, "max_new_tokens": 1024}
    assert aspect is None and pipe.image_aspect_ratio == "pad"  # raw processor only during SQA
    lines = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    assert list(lines[0]) == ["question_id", "prompt", "text", "answer_id", "model_id", "metadata"]
    assert [line["text"] for line in lines] == ["answer 1.0", "answer 1.1", "answer 1.2", "answer 2.0"]
    assert len({line["answer_id"] for line in lines}) == 4 and lines[0]["metadata"] == {}

    pipe = RecordingPipe()
    generate_answers(pipe, "gqa", read_items("gqa", data), tmp_path / "g.jsonl", "m", batch_size=8)
    [(requests, settings, aspect)] = pipe.calls
    assert aspect == "pad" and settings["max_new_tokens"] == 128 and len(requests) == 4
    mm = RecordingPipe()
    generate_answers(mm, "mmbench", read_items("mmbench", data)[:1], tmp_path / "m.jsonl", "m")
    line = json.loads((tmp_path / "m.jsonl").read_text())
    assert list(line) == ["question_id", "round_id", "prompt", "text", "options", "option_char", "answer_id", "model_id", "metadata"]
