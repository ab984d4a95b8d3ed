"""The OpenAI-compatible server against a tiny real model, driven by the official `openai` client."""
from __future__ import annotations

import base64
import io
import threading

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from mobilevlm.generation import Pipeline  # noqa: E402
from mobilevlm.serve.app import ServerSettings, create_app  # noqa: E402
from mobilevlm.serve.background import BackgroundServer  # noqa: E402
from mobilevlm.testing import make_tiny_checkpoint  # noqa: E402

MODEL = "tiny-vlm"
MAX_IMAGE_BYTES = 60_000
MAX_PIXELS = 400 * 400


def png(color, size=(40, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, mime="image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(text, *images):
    parts = [{"type": "image_url", "image_url": {"url": data_url(png(c))}} for c in images]
    return {"role": "user", "content": parts + [{"type": "text", "text": text}]}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def server(pipe):
    settings = ServerSettings(model_name=MODEL, max_queue=12, max_body_bytes=400_000,
                              max_image_bytes=MAX_IMAGE_BYTES, max_image_pixels=MAX_PIXELS)
    with BackgroundServer(create_app(pipe, settings)) as url:
        yield url


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="none", max_retries=0, timeout=60)


def ask(client, messages, **kw):
    kw.setdefault("max_tokens", 12)
    return client.chat.completions.create(model=MODEL, messages=messages, temperature=0, **kw)


def answers_hello_properly(client, pipe) -> bool:
    """The server still gives a plain request the pipeline's own answer (an empty or garbled reply fails)."""
    expected = pipe.generate(pipe.build_prompt("Hello", 0), max_new_tokens=2)
    return bool(expected) and ask(client, [{"role": "user", "content": "Hello"}], max_tokens=2).choices[0].message.content == expected


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    health = httpx.get(server + "/health").json()
    assert health["status"] == "ok" and health["queue"]["limit"] == 12


def test_text_answer_equals_pipeline(client, pipe):
    reply = ask(client, [{"role": "user", "content": "Where is the cat?"}], max_tokens=10)
    expected = pipe.generate(pipe.build_prompt("Where is the cat?", 0), max_new_tokens=10)
    assert reply.choices[0].message.content == expected
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.prompt_tokens > 20 and 0 < reply.usage.completion_tokens <= 10


def test_image_answer_equals_pipeline(client, pipe):
    reply = ask(client, [user("What is in the image?", (200, 30, 30))], max_tokens=8)
    image = Image.new("RGB", (40, 30), (200, 30, 30))
    expected = pipe.generate(pipe.build_prompt("What is in the image?", 1), [image], max_new_tokens=8)
    assert reply.choices[0].message.content == expected
    assert reply.usage.prompt_tokens > pipe.model.config.num_image_tokens


def test_streaming_equals_non_streaming(client):
    messages = [{"role": "user", "content": "Hello world! How are you today?"}]
    plain = ask(client, messages, max_tokens=14).choices[0].message.content
    chunks = list(ask(client, messages, max_tokens=14, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == plain
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["length"]  # the random model does not stop by itself within 14 tokens
    assert chunks[-1].usage.completion_tokens == 14 and chunks[-1].choices == []


def test_stop_sequence_cuts_the_answer(client):
    messages = [{"role": "user", "content": "Hello world!"}]
    full = ask(client, messages, max_tokens=20).choices[0].message.content
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = ask(client, messages, max_tokens=20, stop=[stop]).choices[0].message.content
    assert cut == full[:full.index(stop)].strip()


def test_multi_turn_with_system_and_images(client, pipe):
    messages = [{"role": "system", "content": "Answer briefly."}, user("What is in the image?", (0, 0, 255)),
                {"role": "assistant", "content": "A blue square."}, user("And now?", (0, 255, 0))]
    reply = ask(client, messages, max_tokens=6).choices[0].message.content
    conv = pipe.conversation()
    conv.system = "Answer briefly."
    conv.append_message("USER", "<image>\nWhat is in the image?")
    conv.append_message("ASSISTANT", "A blue square.")
    conv.append_message("USER", "<image>\nAnd now?")
    conv.append_message("ASSISTANT", None)
    images = [Image.new("RGB", (40, 30), c) for c in ((0, 0, 255), (0, 255, 0))]
    assert reply == pipe.generate(conv.get_prompt(), images, max_new_tokens=6)


def test_eight_concurrent_clients_each_get_their_own_answer(client):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (250, 250, 0), (0, 0, 0), (255, 255, 255), (128, 0, 128),
              (0, 128, 128)]
    questions = ["What is in the image?", "Is there a blue triangle?", "What colour is the square?", "Hello",
                 "Where is the cat?", "What does the sign say?", "one two three", "Answer yes or no."]
    requests = [[user(q, c)] if i % 2 else [{"role": "user", "content": q}]
                for i, (q, c) in enumerate(zip(questions, colors))]
    alone = [ask(client, m, max_tokens=10 + i).choices[0].message.content for i, m in enumerate(requests)]
    assert len(set(alone)) > 4  # distinct answers, so a mix-up would show
    together: list[str | None] = [None] * 8
    barrier = threading.Barrier(8)

    def run(i):
        barrier.wait()
        stream = i % 3 == 0
        reply = ask(client, requests[i], max_tokens=10 + i, stream=stream)
        together[i] = ("".join(c.choices[0].delta.content or "" for c in reply).strip() if stream
                       else reply.choices[0].message.content)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert together == alone


def expect_error(server, status, body, fragment, client, pipe):
    response = httpx.post(server + "/v1/chat/completions", content=body,
                          headers={"Content-Type": "application/json"}, timeout=60)
    assert response.status_code == status, response.text
    assert fragment in response.json()["error"]["message"]
    assert answers_hello_properly(client, pipe)  # ... and the server still answers properly afterwards


def test_invalid_json_is_400(server, client, pipe):
    expect_error(server, 400, b'{"model": "tiny-vlm", "messages": [', "not valid JSON", client, pipe)
    expect_error(server, 400, b'[1, 2]', "JSON object", client, pipe)


@pytest.mark.parametrize("error, kwargs, fragment", [
    ("BadRequestError", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not base64@@"}}]}]), "invalid base64"),
    ("BadRequestError", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(b"just some text, not a picture", "text/plain")}}]}]),
     "not an image"),
    ("BadRequestError", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png((1, 2, 3))[:60])}}]}]), "messages.0.content.0"),
    ("BadRequestError", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": data_url(png((9, 9, 9), (500, 500)))}}]}]), "exceeds the limit"),
    ("NotFoundError", dict(model="gpt-4o"), "does not exist"),
    ("BadRequestError", dict(messages=[{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}}]}]), "--allow-remote-images"),
    ("BadRequestError", dict(messages=[{"role": "assistant", "content": "Hi"}]), "start with a user message"),
    ("BadRequestError", dict(messages=[{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]),
     "last message must be from the user"),
    ("BadRequestError", dict(messages=[{"role": "user", "content": "a <image> tag"}]), "reserved tag"),
    ("BadRequestError", dict(messages=[{"role": "tool", "content": "42"}]), "not supported"),
    ("BadRequestError", dict(messages=[{"role": "user", "content": "Hi"}], temperature=5), "temperature"),
    ("BadRequestError", dict(messages=[{"role": "user", "content": "Hi " * 3000}]), "context"),
    ("BadRequestError", dict(messages=[{"role": "user", "content": "Hi"}], n=2), "n=1"),
])
def test_bad_requests_get_4xx_with_a_message(client, pipe, error, kwargs, fragment):
    kwargs = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, **kwargs}
    with pytest.raises(getattr(openai, error)) as caught:
        client.chat.completions.create(**kwargs)
    assert 400 <= caught.value.status_code < 500
    assert fragment in caught.value.message
    assert answers_hello_properly(client, pipe)


def test_oversized_image_and_body_are_413(client, server, pipe):
    with pytest.raises(openai.APIStatusError) as caught:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "data:image/png;base64," + "A" * 100_000}}]}])
    assert caught.value.status_code == 413
    expect_error(server, 413, b'{"model": "tiny-vlm", "messages": [], "pad": "' + b"x" * 500_000 + b'"}',
                 "limit", client, pipe)
    # without a Content-Length (chunked upload) the limit is enforced while reading
    expect_error(server, 413, (b"x" * 50_000 for _ in range(10)), "exceeds the limit", client, pipe)


def test_unknown_route_is_404_json(server):
    response = httpx.get(server + "/v2/nothing")
    assert response.status_code == 404 and "error" in response.json()


def test_sampling_with_a_seed_is_repeatable(client):
    messages = [{"role": "user", "content": "Tell me a long story."}]

    def sample(seed):
        return client.chat.completions.create(model=MODEL, messages=messages, temperature=1.0, top_p=0.9,
                                              max_tokens=24, seed=seed).choices[0].message.content

    assert sample(1) == sample(1)
    assert len({sample(1), sample(2), sample(3)}) > 1
