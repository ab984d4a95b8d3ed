"""Rendering OpenAI messages into the v1 template, and decoding image URLs (no model, no server)."""
from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from mobilevlm.conversation import VICUNA_V1_SYSTEM, get_conv_template
from mobilevlm.serve.apierror import ApiError
from mobilevlm.serve.images import decode_data_url, fetch_image
from mobilevlm.serve.messages import render_messages
from mobilevlm.serve.schema import ChatRequest, parse_chat_request


def fake_fetch(url, where):
    return Image.new("RGB", (4, 4), url)  # the "URL" is a colour name, so the order of images can be checked


def render(messages, max_images=8):
    request = ChatRequest.model_validate({"model": "m", "messages": messages})
    return render_messages(request.messages, get_conv_template("v1"), fake_fetch, max_images)


def image(colour):
    return {"type": "image_url", "image_url": {"url": colour}}


def test_images_become_tags_where_they_stand_across_turns():
    out = render([
        {"role": "user", "content": [image("red"), {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A red square."},
        {"role": "user", "content": [{"type": "text", "text": "Compare with"}, image("blue")]},
    ])
    assert out.prompt == (f"{VICUNA_V1_SYSTEM} USER: <image>\nWhat is this? ASSISTANT: A red square.</s>"
                          "USER: Compare with\n<image> ASSISTANT:")
    assert [im.getpixel((0, 0)) for im in out.images] == [(255, 0, 0), (0, 0, 255)]


def test_system_messages_replace_the_template_system_prompt():
    out = render([{"role": "system", "content": "Be terse."}, {"role": "developer", "content": "Use French."},
                  {"role": "user", "content": "Hi"}])
    assert out.prompt == "Be terse.\nUse French. USER: Hi ASSISTANT:"
    assert render([{"role": "user", "content": "Hi"}]).prompt == f"{VICUNA_V1_SYSTEM} USER: Hi ASSISTANT:"


def test_consecutive_messages_of_one_role_are_merged():
    out = render([{"role": "user", "content": "one"}, {"role": "user", "content": [image("red")]}])
    assert out.prompt.endswith("USER: one\n<image> ASSISTANT:") and len(out.images) == 1


@pytest.mark.parametrize("messages, fragment", [
    ([{"role": "system", "content": [image("red")]}, {"role": "user", "content": "x"}], "only accepted in user"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": [image("red")]},
      {"role": "user", "content": "y"}], "only accepted in user"),
    ([{"role": "user", "content": [image("red"), image("red"), image("red")]}], "more than 2 images"),
    ([{"role": "system", "content": "only a system prompt"}], "last message must be from the user"),
    ([{"role": "user", "content": None}], "needs content"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "content": None}, {"role": "user", "content": "y"}],
     "messages.1.content: the message is empty"),
    ([{"role": "user", "content": "  "}], "empty"),
])
def test_malformed_conversations_are_refused(messages, fragment):
    with pytest.raises(ApiError) as caught:
        render(messages, max_images=2)
    assert caught.value.status == 400 and fragment in caught.value.message


def test_request_validation_names_the_field():
    with pytest.raises(ApiError) as caught:
        parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": 3}')
    assert caught.value.param == "top_p"
    with pytest.raises(ApiError, match="messages"):
        parse_chat_request(b'{"model": "m", "messages": []}')
    with pytest.raises(ApiError, match="at most 4 stop"):
        parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "stop": ["a","b","c","d","e"]}')
    with pytest.raises(ApiError) as caught:
        parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}')
    assert caught.value.param == "messages.0.content.0" and "'text', 'image_url'" in caught.value.message
    with pytest.raises(ApiError) as caught:
        parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}')
    assert caught.value.message == "messages.0.content.0.image_url: Field required"
    request = parse_chat_request(b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", '
                                 b'"image_url": "data:,x"}]}], "stop": "END", "frequency_penalty": 0.5}')
    assert request.messages[0].content[0].image_url.url == "data:,x" and request.stop_list == ["END"]


def test_data_urls():
    picture = io.BytesIO()
    Image.new("RGBA", (3, 2), (0, 255, 0, 255)).save(picture, format="PNG")
    encoded = base64.b64encode(picture.getvalue()).decode()
    wrapped = "\n".join(encoded[i:i + 10] for i in range(0, len(encoded), 10))  # MIME-style line breaks are fine
    assert decode_data_url(f"data:image/png;base64,{wrapped}", "f", 10_000) == picture.getvalue()
    loaded = fetch_image(f"data:image/png;base64,{encoded}", "f", max_bytes=10_000, max_pixels=10, allow_remote=False)
    assert loaded.mode == "RGB" and loaded.size == (3, 2)
    with pytest.raises(ApiError, match="only base64"):
        decode_data_url("data:image/png,rawbytes", "f", 10_000)
    with pytest.raises(ApiError, match="malformed"):
        decode_data_url("data:image/png;base64", "f", 10_000)
    with pytest.raises(ApiError) as caught:
        decode_data_url(f"data:image/png;base64,{encoded}", "f", 10)
    assert caught.value.status == 413
    with pytest.raises(ApiError, match="exceeds the limit of 5"):
        fetch_image(f"data:image/png;base64,{encoded}", "messages.0.content.0.image_url", max_bytes=10_000,
                    max_pixels=5, allow_remote=False)
