"""The Python inference API: greedy decoding, batching, streaming, stop strings, chat, inference_once, bad prompts."""
from __future__ import annotations

import pytest
import torch
from PIL import Image
from transformers import LlamaForCausalLM

from mobilevlm.errors import PromptError
from mobilevlm.processing import process_images, tokenizer_image_token


@pytest.fixture(scope="module")
def images():
    return [Image.new("RGB", (60, 90), (200, 30, 30)), Image.new("RGB", (120, 50), (20, 160, 220)),
            Image.effect_noise((80, 80), 60).convert("RGB")]


def greedy_by_hand(pipe, prompt: str, pil_images, steps: int) -> str:
    """Full forward passes and argmax, no cache, no generate(): what greedy decoding must produce."""
    ids = tokenizer_image_token(prompt, pipe.tokenizer)
    pixels = process_images(pil_images, pipe.image_processor, "pad") if pil_images else None
    new: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            token = int(pipe.model(input_ids=torch.tensor([ids + new]), images=pixels).logits[0, -1].argmax())
            if token == pipe.tokenizer.eos_token_id:
                break
            new.append(token)
    return pipe.tokenizer.decode(new, skip_special_tokens=True).strip()


def test_generate_equals_greedy_by_hand(tiny_pipeline, images):
    prompt = tiny_pipeline.build_prompt("What is in the image?")
    answer = tiny_pipeline.generate(prompt, images[:1], max_new_tokens=8)
    assert answer and answer == greedy_by_hand(tiny_pipeline, prompt, images[:1], 8)


def test_two_images_and_text_only_prompts(tiny_pipeline, images):
    two = tiny_pipeline.build_prompt("Compare them.", num_images=2)
    assert two.count("<image>\n") == 2
    assert tiny_pipeline.generate(two, images[:2], max_new_tokens=6) == greedy_by_hand(tiny_pipeline, two, images[:2], 6)
    text = tiny_pipeline.build_prompt("Hello there.", num_images=0)
    assert "<image>" not in text
    assert tiny_pipeline.generate(text, max_new_tokens=6) == greedy_by_hand(tiny_pipeline, text, [], 6)


def test_preprocessed_pixels_stand_in_for_their_image(tiny_pipeline, images):
    two = tiny_pipeline.build_prompt("Compare them.", num_images=2)
    held = [tiny_pipeline.pixel_values([image]) for image in images[:2]]  # what the server queues
    assert held[0].shape[0] == 1
    assert torch.equal(tiny_pipeline.pixel_values([held[0], images[1]]), tiny_pipeline.pixel_values(images[:2]))
    assert tiny_pipeline.generate(two, held, max_new_tokens=6) == tiny_pipeline.generate(two, images[:2], max_new_tokens=6)


def test_batch_equals_one_by_one(tiny_pipeline, images):
    requests = [
        (tiny_pipeline.build_prompt("What is in the image?"), [images[0]]),
        (tiny_pipeline.build_prompt("Describe the picture in detail, please, with all the colours."), [images[1]]),
        (tiny_pipeline.build_prompt("Hello world! How are you today?", num_images=0), []),
        (tiny_pipeline.build_prompt("Compare.", num_images=2), [images[2], images[0]]),
    ]
    batched = tiny_pipeline.generate_batch(requests, max_new_tokens=8)
    single = [tiny_pipeline.generate(prompt, imgs, max_new_tokens=8) for prompt, imgs in requests]
    assert batched == single
    assert all(single) and len(set(single)) > 1


def test_stream_joins_to_generate(tiny_pipeline, images):
    prompt = tiny_pipeline.build_prompt("What is in the image?")
    pieces = list(tiny_pipeline.stream(prompt, images[:1], max_new_tokens=8))
    assert len(pieces) > 1
    assert "".join(pieces).strip() == tiny_pipeline.generate(prompt, images[:1], max_new_tokens=8)


def test_stop_strings_cut_the_answer(tiny_pipeline, images):
    prompt = tiny_pipeline.build_prompt("What is in the image?")
    full = tiny_pipeline.generate(prompt, images[:1], max_new_tokens=12)
    stop = full.split()[1][:2]  # a piece from the middle of the answer
    cut = full[: full.index(stop)].strip()
    assert tiny_pipeline.generate(prompt, images[:1], max_new_tokens=12, stop=[stop]) == cut
    assert "".join(tiny_pipeline.stream(prompt, images[:1], max_new_tokens=12, stop=[stop])).strip() == cut


@pytest.mark.parametrize("conv_mode,stop", [("v1", "ASSISTANT"), ("plain", "\n")])
def test_stop_string_in_text_only_prompt_is_not_a_stop(tiny_pipeline, conv_mode, stop):
    # without images the prompt's own ids come first in the decoded sequence; only the answer may stop it
    prompt = tiny_pipeline.build_prompt("Hello there.", num_images=0, conv_mode=conv_mode)
    assert stop in prompt
    full = tiny_pipeline.generate(prompt, max_new_tokens=10)
    assert len(full) > 8
    assert tiny_pipeline.generate(prompt, max_new_tokens=10, stop=[stop]) == full.split(stop)[0].strip()


def test_template_stop_string_is_the_default(tiny_pipeline, images, monkeypatch):
    from mobilevlm.conversation import Conversation, SeparatorStyle, conv_templates
    from mobilevlm.generation import Pipeline

    v1_prompt = tiny_pipeline.build_prompt("What is in the image?")
    full = tiny_pipeline.generate(v1_prompt, images[:1], max_new_tokens=12, stop=[])
    stop = full.split()[1][:2]
    # a SINGLE-style template (like v0, whose stop string is its "###" separator) whose separator occurs in the answer
    template = Conversation(system="Sys", roles=("Q", "A"), messages=[], offset=0, sep_style=SeparatorStyle.SINGLE, sep=stop)
    monkeypatch.setitem(conv_templates, "stop_test", template)
    pipe = Pipeline(tiny_pipeline.tokenizer, tiny_pipeline.model, tiny_pipeline.image_processor,
                    tiny_pipeline.context_len, conv_mode="stop_test")
    assert pipe.generate(v1_prompt, images[:1], max_new_tokens=12) == full.split(stop)[0].strip()
    assert pipe.generate(v1_prompt, images[:1], max_new_tokens=12, stop=[]) == full
    chat = tiny_pipeline.chat(conv_mode="stop_test")
    answer = chat.ask("What is in the image?", images=images[:1], max_new_tokens=12)
    assert stop not in answer and chat.conv.get_prompt().startswith("Sys" + stop + "Q: <image>")


def test_stream_waits_for_complete_utf8_and_holds_back_stop_prefixes(tiny_pipeline):
    from mobilevlm.generation import _QueueStreamer

    tok = tiny_pipeline.tokenizer
    byte = {b: tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in "é☕".encode()}
    word = tok.convert_tokens_to_ids("▁the")
    steps = [[byte[0xC3]], [byte[0xA9]], [word], [byte[0xE2]], [byte[0x98]], [byte[0x95]], [word], [word]]

    def run(stops):
        streamer = _QueueStreamer()
        streamer.put(torch.tensor([0]))  # the prompt, skipped
        for ids in steps:
            streamer.put(torch.tensor(ids))
        streamer.end()
        return list(tiny_pipeline._stream_text(streamer, stops))

    pieces = run([])
    assert "".join(pieces) == "é the☕ the the"
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(run(["☕ the t"])) == "é the"


def test_sampling_and_beams(tiny_pipeline, images):
    prompt = tiny_pipeline.build_prompt("What is in the image?")
    torch.manual_seed(0)
    first = tiny_pipeline.generate(prompt, images[:1], temperature=0.9, top_p=0.9, max_new_tokens=6)
    torch.manual_seed(0)
    assert tiny_pipeline.generate(prompt, images[:1], temperature=0.9, top_p=0.9, max_new_tokens=6) == first


def transformers_beam_search(pipe, prompt: str, pil_images, beams: int, steps: int) -> list[int]:
    """transformers' own generate (beam search when beams > 1) on the prompt with its images spliced in."""
    ids, pixels, _ = pipe.encode(prompt, pil_images, steps)
    ids = torch.tensor([ids])
    with torch.inference_mode():
        embeds, mask, _, _ = pipe.model.prepare_inputs_labels_for_multimodal(ids, torch.ones_like(ids), None, pixels)
        out = LlamaForCausalLM.generate(pipe.model, inputs_embeds=embeds, attention_mask=mask, num_beams=beams,
                                        do_sample=False, max_new_tokens=steps, eos_token_id=pipe.tokenizer.eos_token_id,
                                        pad_token_id=pipe.tokenizer.pad_token_id)
    return out[0].tolist()


def test_beam_search_is_transformers_beam_search(tiny_pipeline, images):
    prompt = tiny_pipeline.build_prompt("What is in the image?")
    beams = transformers_beam_search(tiny_pipeline, prompt, images[:1], beams=2, steps=6)
    assert beams != transformers_beam_search(tiny_pipeline, prompt, images[:1], beams=1, steps=6)  # not greedy's
    ids, pixels, budget = tiny_pipeline.encode(prompt, images[:1], 6)
    settings = tiny_pipeline._settings({"num_beams": 2, "max_new_tokens": 6})
    assert tiny_pipeline._generate_ids([ids], pixels, settings, budget)[0].tolist() == beams
    answer = tiny_pipeline.generate(prompt, images[:1], num_beams=2, max_new_tokens=6)
    assert answer == tiny_pipeline.tokenizer.decode(beams, skip_special_tokens=True).strip()


def test_chat_keeps_history(tiny_pipeline, images):
    chat = tiny_pipeline.chat()
    first = chat.ask("What is it?", images=[images[0]], max_new_tokens=6)
    second = chat.ask("And the colour?", max_new_tokens=6)
    system = tiny_pipeline.conversation().system
    history = f"{system} USER: <image>\nWhat is it? ASSISTANT: {first}</s>USER: And the colour? ASSISTANT:"
    assert chat.conv.messages[-1][1] == second
    assert second == tiny_pipeline.generate(history, [images[0]], max_new_tokens=6)
    with pytest.raises(PromptError):
        chat.ask("<image> too many tags", max_new_tokens=2)
    assert len(chat.conv.messages) == 4  # the failed turn was rolled back


def test_abandoned_chat_stream_leaves_no_half_turn(tiny_pipeline, images):
    chat = tiny_pipeline.chat()
    stream = chat.ask_stream("What is it?", images=[images[0]], max_new_tokens=6)
    next(stream)
    stream.close()  # the reader went away mid-answer
    assert chat.conv.messages == [] and chat.images == []
    chat.ask("And now?", max_new_tokens=2)
    assert chat.conv.get_prompt().endswith("USER: And now? ASSISTANT: " + chat.conv.messages[-1][1] + "</s>")


def test_a_single_stop_string_is_not_a_set_of_characters(tiny_pipeline):
    assert tiny_pipeline._settings({"stop": "###"}).stop == ("###",)


def test_pil_images_of_any_mode(tiny_pipeline):
    prompt = tiny_pipeline.build_prompt("What is it?")
    grey = Image.new("L", (40, 60), 90)
    assert tiny_pipeline.generate(prompt, [grey], max_new_tokens=5) == \
        tiny_pipeline.generate(prompt, [grey.convert("RGB")], max_new_tokens=5)
    deep = Image.new("I;16", (30, 30), 0x4000)
    assert tiny_pipeline.generate(prompt, [deep], max_new_tokens=5) == \
        tiny_pipeline.generate(prompt, [Image.new("RGB", (30, 30), (64, 64, 64))], max_new_tokens=5)


def test_prompt_errors(tiny_pipeline, images):
    one = tiny_pipeline.build_prompt("What?")
    with pytest.raises(PromptError, match="1 <image> tag.*2 image"):
        tiny_pipeline.generate(one, images[:2])
    with pytest.raises(PromptError, match="1 <image> tag.*0 image"):
        tiny_pipeline.generate(one)
    with pytest.raises(PromptError, match="2 <image> tag.*1 image"):
        tiny_pipeline.generate_batch([(one, images[:1]), (tiny_pipeline.build_prompt("x", 2), images[:1])])
    long = tiny_pipeline.build_prompt("the cat is on the mat " * 200)
    with pytest.raises(PromptError, match=r"the prompt is \d+ tokens .*context is 1024"):
        tiny_pipeline.generate(long, images[:1])
    with pytest.raises(Exception, match="missing.png"):
        tiny_pipeline.generate(one, ["missing.png"])


def test_text_only_checkpoint(tiny_text_dir):
    from mobilevlm.generation import Pipeline

    pipe = Pipeline.from_pretrained(tiny_text_dir)
    assert not pipe.is_multimodal
    prompt = pipe.build_prompt("Hello", num_images=0)
    assert pipe.generate(prompt, max_new_tokens=5) == greedy_by_hand(pipe, prompt, [], 5)
    with pytest.raises(PromptError, match="text-only"):
        pipe.generate(pipe.build_prompt("What?"), [Image.new("RGB", (8, 8))])


def test_inference_once_with_seed_readme_args(tiny_v2_dir, tmp_path, capsys):
    from mobilevlm import inference_once
    from mobilevlm.generation import Pipeline

    image_file = tmp_path / "red.png"
    Image.new("RGB", (60, 90), (200, 30, 30)).save(image_file)
    prompt = "What is in the image?"
    args = type("Args", (), {
        "model_path": str(tiny_v2_dir), "image_file": str(image_file), "prompt": prompt, "conv_mode": "v1",
        "temperature": 0, "top_p": None, "num_beams": 1, "max_new_tokens": 10, "load_8bit": False, "load_4bit": False,
    })()
    answer = inference_once(args)
    assert capsys.readouterr().out == answer + "\n"
    pipe = Pipeline.from_pretrained(tiny_v2_dir)
    assert answer == greedy_by_hand(pipe, pipe.build_prompt(prompt), [Image.open(image_file).convert("RGB")], 10)
