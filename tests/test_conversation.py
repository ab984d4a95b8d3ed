"""Conversation templates: the exact strings of the original (§5), written out by hand here."""
from __future__ import annotations

import pytest

from mobilevlm.conversation import conv_templates, get_conv_template

V1_SYSTEM = ("A chat between a curious user and an artificial intelligence assistant. "
             "The assistant gives helpful, detailed, and polite answers to the user's questions.")
LLAVA_LLAMA_2_SYSTEM = ("You are a helpful language and vision assistant. You are able to understand the visual content "
                        "that the user provides, and assist the user with a variety of tasks using natural language.")


def build(name: str, *turns) -> str:
    conv = get_conv_template(name)
    for i, message in enumerate(turns):
        conv.append_message(conv.roles[i % 2], message)
    return conv.get_prompt()


def test_registered_names():
    assert set(conv_templates) == {"v1", "vicuna_v1", "plain", "llava_llama_2", "llama_2", "default", "v0"}
    with pytest.raises(KeyError, match="unknown conversation template 'v2'"):
        get_conv_template("v2")


@pytest.mark.parametrize("name", ["v1", "vicuna_v1"])
def test_v1_canonical_single_turn(name):
    assert build(name, "<image>\nWhat is in the image?", None) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is in the image? ASSISTANT:")
    assert get_conv_template(name).stop_str == "</s>"


def test_v1_multi_turn():
    prompt = build("v1", "<image>\nWhat is it?", "A red circle.", "And the background?", None)
    assert prompt == (V1_SYSTEM + " USER: <image>\nWhat is it? ASSISTANT: A red circle.</s>"
                      "USER: And the background? ASSISTANT:")
    finished = build("v1", "Hi", "Hello.")
    assert finished == V1_SYSTEM + " USER: Hi ASSISTANT: Hello.</s>"


def test_plain():
    assert build("plain", "<image>", None) == "<image>\n"
    assert build("plain", "<image>\n", None) == "<image>\n\n"
    assert build("plain", "<image>", "A red circle.") == "<image>\nA red circle.\n"
    assert build("plain", "<image>\nQ", "A", "Q2", None) == "<image>\nQ\nA\nQ2\n"  # no 'None' leaks in
    assert get_conv_template("plain").stop_str == "\n"


def test_llava_llama_2():
    assert build("llava_llama_2", "<image>\nWhat is it?", None) == (
        f"[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\n<image>\nWhat is it? [/INST]")
    assert build("llava_llama_2", "Q1", "A1", "Q2", None) == (
        f"[INST] <<SYS>>\n{LLAVA_LLAMA_2_SYSTEM}\n<</SYS>>\n\nQ1 [/INST] A1 </s><s>[INST] Q2 [/INST]")
    assert get_conv_template("llava_llama_2").stop_str == "<s>"  # the original scripts' rule: sep unless TWO


def test_llama_2_system_prompt():
    prompt = build("llama_2", "Hi", None)
    assert prompt.startswith("[INST] <<SYS>>\nYou are a helpful, respectful and honest assistant. Always answer as "
                             "helpfully as possible, while being safe.  Your answers should not include")
    assert prompt.endswith("please don't share false information.\n<</SYS>>\n\nHi [/INST]")
    with pytest.raises(ValueError):
        build("llama_2", None)


@pytest.mark.parametrize("name", ["default", "v0"])
def test_vicuna_v0(name):
    prompt = build(name, "<image>\nWhat is it?", None)
    assert prompt.startswith(
        "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the human's questions.###Human: What are the key differences between "
        "renewable and non-renewable energy sources?###Assistant: Renewable energy sources are those that")
    assert prompt.endswith("their depletion can lead to economic and social instability.\n"
                           "###Human: <image>\nWhat is it?###Assistant:")
    assert get_conv_template(name).stop_str == "###"


def test_copy_leaves_template_untouched():
    conv = get_conv_template("default")
    conv.append_message("Human", "x")
    conv.messages[0][1] = "changed"
    assert len(conv_templates["default"].messages) == 2
    assert conv_templates["default"].messages[0][1].startswith("What are the key differences")
    assert conv_templates["v1"].messages == []


def test_gui_tuple_message_moves_tag_to_front():
    conv = get_conv_template("v1")
    conv.append_message("USER", ("What is <image> this?", object(), "pad"))
    conv.append_message("ASSISTANT", None)
    assert conv.get_prompt() == V1_SYSTEM + " USER: <image>\nWhat is  this? ASSISTANT:"
