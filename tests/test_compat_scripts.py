"""Code written for the original MobileVLM, run unchanged on this package (CPU edits only: no `.cuda()`, fp32).

The two flows below replay, call for call and in the same order, the original's `scripts/inference.py`
(`inference_once`) and its `mobilevlm/eval/model_vqa_loader.py` loop, through the original's import paths.
Their answers must be what this package's own `Pipeline.generate` and evaluation produce.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from mobilevlm.constants import DEFAULT_IM_END_TOKEN, DEFAULT_IM_START_TOKEN, DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
from mobilevlm.conversation import SeparatorStyle, conv_templates
from mobilevlm.model.mobilevlm import load_pretrained_model
from mobilevlm.utils import (KeywordsStoppingCriteria, disable_torch_init, get_model_name_from_path, process_images,
                             tokenizer_image_token)


@pytest.fixture(autouse=True)
def undo_disable_torch_init(monkeypatch):
    """The scripts' disable_torch_init() changes torch for the whole process, as the original's does; the tests
    after these build models whose random weights depend on the default initialisation."""
    monkeypatch.setattr(torch.nn.Linear, "reset_parameters", torch.nn.Linear.reset_parameters)
    monkeypatch.setattr(torch.nn.LayerNorm, "reset_parameters", torch.nn.LayerNorm.reset_parameters)


def inference_once(args):
    """scripts/inference.py's function with `.cuda()` dropped and float16 -> float32; returns more for checking."""
    disable_torch_init()
    tokenizer, model, image_processor, context_len = load_pretrained_model(args.model_path, args.load_8bit, args.load_4bit)
    images = [Image.open(args.image_file).convert("RGB")]
    images_tensor = process_images(images, image_processor, model.config).to(model.device, dtype=torch.float32)
    conv = conv_templates[args.conv_mode].copy()
    conv.append_message(conv.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + args.prompt)
    conv.append_message(conv.roles[1], None)
    prompt = conv.get_prompt()
    stop_str = conv.sep if conv.sep_style != SeparatorStyle.TWO else conv.sep2
    input_ids = tokenizer_image_token(prompt, tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt").unsqueeze(0)
    stopping_criteria = KeywordsStoppingCriteria([stop_str], tokenizer, input_ids)
    with torch.inference_mode():
        output_ids = model.generate(
            input_ids,
            images=images_tensor,
            do_sample=True if args.temperature > 0 else False,
            temperature=args.temperature,
            top_p=args.top_p,
            num_beams=args.num_beams,
            max_new_tokens=args.max_new_tokens,
            use_cache=True,
            stopping_criteria=[stopping_criteria],
        )
    input_token_len = input_ids.shape[1]
    n_diff_input_output = (input_ids != output_ids[:, :input_token_len]).sum().item()
    outputs = tokenizer.batch_decode(output_ids[:, input_token_len:], skip_special_tokens=True)[0]
    outputs = outputs.strip()
    if outputs.endswith(stop_str):
        outputs = outputs[: -len(stop_str)]
    return outputs.strip(), n_diff_input_output, output_ids[0, input_token_len:].tolist()


def script_args(model_path, image_file, **overrides):
    values = dict(model_path=str(model_path), image_file=str(image_file), prompt="What is in the image?",
                  conv_mode="v1", temperature=0, top_p=None, num_beams=1, max_new_tokens=12, load_8bit=False,
                  load_4bit=False)
    return SimpleNamespace(**{**values, **overrides})


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "view.png"
    image = Image.new("RGB", (90, 50), (30, 140, 220))
    image.paste((240, 200, 20), (10, 5, 45, 40))
    image.save(path)
    return path


@pytest.mark.parametrize("conv_mode", ["v1", "plain", "llava_llama_2"])
def test_inference_script_answers_as_pipeline(tiny_v1_bin_dir, photo, conv_mode):
    from mobilevlm.generation import Pipeline

    answer, n_diff, _ = inference_once(script_args(tiny_v1_bin_dir, photo, conv_mode=conv_mode))
    pipe = Pipeline.from_pretrained(tiny_v1_bin_dir, conv_mode=conv_mode)
    expected = pipe.generate(pipe.build_prompt("What is in the image?"), [photo], max_new_tokens=12)
    assert n_diff == 0  # the original's check: the output starts with the prompt ids, placeholder included
    assert answer == expected and len(answer) > 0


def test_keywords_stopping_criteria_stops_where_the_original_does(tiny_v1_bin_dir, photo):
    """A keyword the model really produces: generation ends at the first step whose last new tokens contain it."""
    _, _, free = inference_once(script_args(tiny_v1_bin_dir, photo, max_new_tokens=10))
    from mobilevlm.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_v1_bin_dir)
    step = next(i for i in range(3, len(free)) if tokenizer.decode(free[i:i + 1]).strip())
    keyword = tokenizer.decode(free[step:step + 1]).strip()
    conv = conv_templates["v1"]
    stopped_at = next(i for i in range(len(free)) if keyword in tokenizer.decode(free[max(0, i + 1 - 3):i + 1]))
    try:
        conv.sep2 = keyword  # the script takes its stop string from the template
        _, _, stopped = inference_once(script_args(tiny_v1_bin_dir, photo, max_new_tokens=10))
    finally:
        conv.sep2 = "</s>"
    assert stopped == free[:stopped_at + 1] and stopped_at < len(free) - 1


def test_process_images_reads_the_config_as_the_original(tiny_v2_dir):
    from mobilevlm.processing import build_image_processor

    processor = build_image_processor(96, tiny_v2_dir)
    image = Image.new("RGB", (120, 60), (200, 30, 30))
    padded, plain = process_images([image], processor, "pad"), process_images([image], processor, None)
    assert not torch.equal(padded, plain)
    assert torch.equal(process_images([image], processor, SimpleNamespace(image_aspect_ratio="pad")), padded)
    for config in (SimpleNamespace(image_aspect_ratio="square"), SimpleNamespace(image_aspect_ratio="anyres"),
                   SimpleNamespace()):
        assert torch.equal(process_images([image], processor, config), plain)
    assert torch.equal(process_images([image], processor, "square"), plain)
    with pytest.raises(ValueError, match=r"'anyres'.*'pad', 'square'"):
        process_images([image], processor, "anyres")


class CustomDataset(Dataset):
    """model_vqa_loader.py's dataset, unchanged (it reads the module-level `args`, as there)."""

    def __init__(self, questions, image_folder, tokenizer, image_processor, model_config):
        self.questions = questions
        self.image_folder = image_folder
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.model_config = model_config

    def __getitem__(self, index):
        line = self.questions[index]
        image_file = line["image"]
        qs = line["text"]
        if self.model_config.mm_use_im_start_end:
            qs = DEFAULT_IM_START_TOKEN + DEFAULT_IMAGE_TOKEN + DEFAULT_IM_END_TOKEN + "\n" + qs
        else:
            qs = DEFAULT_IMAGE_TOKEN + "\n" + qs
        conv = conv_templates[args.conv_mode].copy()
        conv.append_message(conv.roles[0], qs)
        conv.append_message(conv.roles[1], None)
        prompt = conv.get_prompt()
        image = Image.open(os.path.join(self.image_folder, image_file)).convert("RGB")
        image_tensor = process_images([image], self.image_processor, self.model_config)[0]
        input_ids = tokenizer_image_token(prompt, self.tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
        return input_ids, image_tensor

    def __len__(self):
        return len(self.questions)


args = SimpleNamespace(conv_mode="v1", temperature=0, top_p=None, num_beams=1)


def eval_model(model_path, question_file, image_folder):
    """model_vqa_loader.py's eval_model loop (answers returned instead of written; DataLoader workers off)."""
    disable_torch_init()
    model_name = get_model_name_from_path(os.path.expanduser(model_path))
    tokenizer, model, image_processor, context_len = load_pretrained_model(model_path)
    questions = [json.loads(q) for q in open(question_file)]
    dataset = CustomDataset(questions, image_folder, tokenizer, image_processor, model.config)
    data_loader = DataLoader(dataset, batch_size=1, num_workers=0, shuffle=False)
    answers = {}
    for (input_ids, image_tensor), line in zip(data_loader, questions):
        stop_str = conv_templates[args.conv_mode].sep if conv_templates[args.conv_mode].sep_style != SeparatorStyle.TWO \
            else conv_templates[args.conv_mode].sep2
        with torch.inference_mode():
            output_ids = model.generate(
                input_ids,
                images=image_tensor.to(dtype=torch.float32),
                do_sample=True if args.temperature > 0 else False,
                temperature=args.temperature,
                top_p=args.top_p,
                num_beams=args.num_beams,
                max_new_tokens=128,
                use_cache=True)
        input_token_len = input_ids.shape[1]
        assert (input_ids != output_ids[:, :input_token_len]).sum().item() == 0
        outputs = tokenizer.batch_decode(output_ids[:, input_token_len:], skip_special_tokens=True)[0]
        outputs = outputs.strip()
        if outputs.endswith(stop_str):
            outputs = outputs[:-len(stop_str)]
        answers[line["question_id"]] = outputs.strip()
    return model_name, answers


def rotated_photo(path):
    """A JPEG whose EXIF says "display rotated": the official scripts ignore the tag, a photo viewer does not."""
    image = Image.new("RGB", (80, 40), (255, 0, 0))
    image.paste((0, 0, 255), (40, 0, 80, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    image.save(path, "JPEG", exif=exif, quality=95)


def test_vqa_loader_loop_answers_as_the_evaluation(tiny_v2_dir, tmp_path):
    from mobilevlm.eval.benchmarks import read_items
    from mobilevlm.eval.generate import generate_answers
    from mobilevlm.eval.records import read_jsonl
    from mobilevlm.generation import Pipeline

    pope = tmp_path / "pope"
    (pope / "val2014").mkdir(parents=True)
    Image.new("RGBA", (70, 40), (10, 200, 60, 90)).save(pope / "val2014" / "a.png")
    rotated_photo(pope / "val2014" / "b.jpg")
    rows = [{"question_id": 1, "image": "a.png", "text": "Is there a cat in the image?", "category": "random"},
            {"question_id": 2, "image": "b.jpg", "text": "What colour is on top?", "category": "random"}]
    (pope / "llava_pope_test.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    name, answers = eval_model(str(tiny_v2_dir) + "/", pope / "llava_pope_test.jsonl", pope / "val2014")
    assert name == tiny_v2_dir.name
    pipe = Pipeline.from_pretrained(tiny_v2_dir)
    items = read_items("pope", tmp_path)
    generate_answers(pipe, "pope", items, tmp_path / "answers.jsonl", name)
    ours = {row["question_id"]: row["text"] for row in read_jsonl(tmp_path / "answers.jsonl")}
    assert ours == answers
    # the evaluation's pixels are the script's: no EXIF rotation, transparency dropped by PIL's convert
    for item, row in zip(items, rows):
        script = process_images([Image.open(pope / "val2014" / row["image"]).convert("RGB")], pipe.image_processor,
                                pipe.model.config)
        assert torch.equal(pipe.pixel_values([item.open_image()]), script)
