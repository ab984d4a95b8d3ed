"""The README's commands, run as a user runs them: `mobilevlm generate` and `mobilevlm chat` in a subprocess."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest
from PIL import Image

from mobilevlm.cli import build_parser


def mobilevlm(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    exe = shutil.which("mobilevlm")
    command = [exe] if exe else [sys.executable, "-m", "mobilevlm.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    return subprocess.run(command + list(args), input=stdin, capture_output=True, text=True, timeout=120, env=env)


@pytest.fixture(scope="module")
def image_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("img") / "cat.png"
    Image.new("RGB", (70, 40), (220, 120, 40)).save(path)
    return path


@pytest.fixture(scope="module")
def reference(tiny_v2_dir):
    from mobilevlm.generation import Pipeline

    return Pipeline.from_pretrained(tiny_v2_dir)


def test_verbs_registered():
    parser = build_parser()
    args = parser.parse_args(["generate", "--model", "m", "--image", "a.png", "--image", "b.png", "--prompt", "q"])
    assert args.image == ["a.png", "b.png"] and args.conv_mode == "v1" and args.temperature == 0.0
    args = parser.parse_args(["chat", "--model", "m"])
    assert args.func.__name__ == "run_chat"


@pytest.mark.slow
def test_generate_command(tiny_v2_dir, image_file, reference):
    done = mobilevlm("generate", "--model", str(tiny_v2_dir), "--image", str(image_file),
                     "--prompt", "What is in the image?", "--max-new-tokens", "8")
    assert done.returncode == 0, done.stderr
    expected = reference.generate(reference.build_prompt("What is in the image?"), [image_file], max_new_tokens=8)
    assert done.stdout.strip() == expected
    assert done.stdout.endswith("\n")


def test_generate_bad_image_is_one_line_error(tiny_v2_dir, capsys):
    from mobilevlm.cli import main

    assert main(["generate", "--model", str(tiny_v2_dir), "--image", "missing.png", "--prompt", "q"]) == 1
    assert capsys.readouterr().err.startswith("mobilevlm generate: error: missing.png: cannot open image file")
    assert main(["generate", "--model", str(tiny_v2_dir / "nothing"), "--prompt", "q"]) == 1
    assert "nothing: no such model directory" in capsys.readouterr().err


@pytest.mark.slow
def test_chat_command_with_image_command(tiny_v2_dir, image_file, reference):
    script = f"What is it?\n/image {image_file}\nDescribe the image.\n/image nowhere.png\n/exit\n"
    done = mobilevlm("chat", "--model", str(tiny_v2_dir), "--max-new-tokens", "6", stdin=script)
    assert done.returncode == 0, done.stderr
    # the prompt "USER: " is printed again after each /image line, so answers are what follows "ASSISTANT: "
    answers = [line.split("ASSISTANT: ", 1)[1].strip() for line in done.stdout.splitlines() if "ASSISTANT: " in line]
    assert len(answers) == 2
    chat = reference.chat()
    assert answers[0] == chat.ask("What is it?", max_new_tokens=6)
    assert answers[1] == chat.ask("Describe the image.", images=[image_file], max_new_tokens=6)
    assert "image added" in done.stderr and "nowhere.png" in done.stderr


def test_generate_in_process_beams_and_text_only(tiny_v2_dir, tiny_text_dir, image_file, reference, capsys):
    from mobilevlm.cli import main
    from mobilevlm.generation import Pipeline

    assert main(["generate", "--model", str(tiny_v2_dir), "--image", str(image_file), "--prompt", "Describe.",
                 "--num-beams", "2", "--max-new-tokens", "5"]) == 0
    prompt = reference.build_prompt("Describe.")
    assert capsys.readouterr().out == reference.generate(prompt, [image_file], num_beams=2, max_new_tokens=5) + "\n"

    assert main(["generate", "--model", str(tiny_text_dir), "--prompt", "Hello", "--max-new-tokens", "5"]) == 0
    text = Pipeline.from_pretrained(tiny_text_dir)
    expected = text.generate(text.build_prompt("Hello", num_images=0), max_new_tokens=5)
    assert capsys.readouterr().out.strip() == expected
