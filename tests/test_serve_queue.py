"""Server behaviour around the model: the bounded queue, disconnects, the API key and remote images."""
from __future__ import annotations

import base64
import functools
import http.server
import io
import json
import threading
import time

import httpx
import pytest
from PIL import Image

openai = pytest.importorskip("openai")

from mobilevlm.generation import Pipeline  # noqa: E402
from mobilevlm.serve.app import ServerSettings, create_app  # noqa: E402
from mobilevlm.serve.background import BackgroundServer  # noqa: E402
from mobilevlm.testing import make_tiny_checkpoint  # noqa: E402

MODEL = "tiny"
LONG = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}], "max_tokens": 1000,
        "temperature": 0}


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


def serve(pipe, **settings):
    return BackgroundServer(create_app(pipe, ServerSettings(model_name=MODEL, **settings)))


def health(url):
    return httpx.get(url + "/health").json()["queue"]


def wait_for(predicate, timeout=10.0):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def first_content_chunk(lines) -> dict:
    """Reads up to the first piece of the answer; the caller keeps `lines` alive (dropping it closes the stream)."""
    for line in lines:
        if line.startswith("data: ") and line != "data: [DONE]":
            chunk = json.loads(line[6:])
            if chunk["choices"][0]["delta"].get("content"):
                return chunk
    raise AssertionError("the stream ended without content")


def test_full_queue_answers_429_and_a_disconnect_frees_the_place(pipe):
    with serve(pipe, max_queue=1) as url, httpx.Client(timeout=60) as http:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with http.stream("POST", url + "/v1/chat/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            first_content_chunk(lines)
            assert health(url)["running"] == 1
            with pytest.raises(openai.RateLimitError) as caught:
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
            assert "busy" in caught.value.message and caught.value.response.headers["retry-after"] == "1"
            # refused before its images are even looked at
            bad_image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}}]
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": bad_image}])
        # closing the stream mid-answer cancels the generation and frees the only place
        wait_for(lambda: health(url)["pending"] == 0)
        stats = health(url)
        assert stats["cancelled"] == 1 and stats["completed"] == 0 and stats["running"] == 0
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                               temperature=0)
        assert reply.choices[0].message.content == pipe.generate(pipe.build_prompt("Hi", 0), max_new_tokens=2) != ""


def test_a_waiting_client_that_leaves_frees_its_place_at_once(pipe):
    with serve(pipe, max_queue=2) as url, httpx.Client(timeout=60) as http:
        with http.stream("POST", url + "/v1/chat/completions", json={**LONG, "stream": True}) as response:
            lines = response.iter_lines()
            first_content_chunk(lines)
            impatient = threading.Thread(target=lambda: pytest.raises(
                httpx.ReadTimeout, httpx.post, url + "/v1/chat/completions", json=LONG, timeout=0.5))
            impatient.start()
            wait_for(lambda: health(url)["pending"] == 2)
            impatient.join()
            wait_for(lambda: health(url)["pending"] == 1)
            assert health(url)["running"] == 1  # the streaming one is still going
            assert health(url)["cancelled"] == 1
        wait_for(lambda: health(url)["pending"] == 0)
        assert health(url)["completed"] == 0


def test_api_key_is_required_on_every_route(pipe):
    with serve(pipe, api_key="s3cret") as url:
        for path in ("/health", "/v1/models", "/", "/static/app.js", "/nowhere"):
            response = httpx.get(url + path)
            assert response.status_code == 401, path
            assert "API key" in response.json()["error"]["message"]
        assert response.headers["www-authenticate"].startswith("Basic")
        assert httpx.get(url + "/health", headers={"Authorization": "Bearer s3cret"}).status_code == 200
        assert httpx.get(url + "/", auth=("anyone", "s3cret")).status_code == 200
        assert httpx.get(url + "/health", auth=("anyone", "wrong")).status_code == 401
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=url + "/v1", api_key="wrong", max_retries=0).models.list()
        client = openai.OpenAI(base_url=url + "/v1", api_key="s3cret", max_retries=0)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=2,
                                               temperature=0)
        assert reply.choices[0].message.content == pipe.generate(pipe.build_prompt("Hi", 0), max_new_tokens=2) != ""


def test_host_check_refuses_other_names_on_every_route(pipe):
    # a page on a domain re-pointed to 127.0.0.1 (DNS rebinding) sends its own name as the Host header
    with serve(pipe, allowed_hosts=("localhost", "127.0.0.1", "::1", "my.box")) as url:
        port = url.rsplit(":", 1)[1]
        for path in ("/health", "/v1/models", "/", "/nowhere"):
            response = httpx.get(url + path, headers={"Host": f"evil.example:{port}"})
            assert response.status_code == 400, path
            assert response.json()["error"]["code"] == "invalid_host" and "--allowed-host" in response.json()["error"]["message"]
        assert httpx.post(url + "/v1/chat/completions", headers={"Host": "evil.example"},
                          json={"model": MODEL, "messages": [{"role": "user", "content": "Hi"}]}).status_code == 400
        for host in (f"localhost:{port}", f"127.0.0.1:{port}", f"[::1]:{port}", "MY.box", "localhost"):
            assert httpx.get(url + "/health", headers={"Host": host}).status_code == 200, host


@pytest.mark.parametrize("header, name", [("localhost:8000", "localhost"), ("[::1]:80", "::1"), ("[::1]", "::1"),
                                          ("Example.COM", "example.com"), ("127.0.0.1:1", "127.0.0.1"), ("", "")])
def test_host_name_drops_the_port_and_brackets(header, name):
    from mobilevlm.serve.middleware import host_name

    assert host_name(header) == name


def test_serve_allows_loopback_names_on_a_loopback_address_and_any_name_elsewhere_unless_told():
    from mobilevlm.serve.cli import _allowed_hosts

    assert _allowed_hosts("127.0.0.1", []) == ("localhost", "127.0.0.1", "::1")
    assert _allowed_hosts("localhost", ["my.box"]) == ("localhost", "127.0.0.1", "::1", "my.box")
    assert _allowed_hosts("0.0.0.0", []) is None
    assert _allowed_hosts("0.0.0.0", ["vlm.example.org"]) == ("vlm.example.org",)


@pytest.fixture
def image_host(tmp_path):
    picture = io.BytesIO()
    Image.new("RGB", (30, 20), (10, 200, 10)).save(picture, format="PNG")
    (tmp_path / "green.png").write_bytes(picture.getvalue())
    (tmp_path / "huge.bin").write_bytes(b"\0" * 70_000)
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path))
    handler.log_message = lambda *args: None
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", picture.getvalue()
    httpd.shutdown()


def test_remote_images_only_with_the_flag(pipe, image_host):
    host, picture = image_host

    def ask(client, url):
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What is in the image?"}]
        return client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}],
                                              max_tokens=6, temperature=0).choices[0].message.content

    with serve(pipe, allow_remote_images=True, max_image_bytes=60_000) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        with pytest.raises(openai.BadRequestError) as caught:  # 127.0.0.1 is not a public host
            ask(client, host + "/green.png")
        assert "non-public address" in caught.value.message
    with serve(pipe, allow_remote_images=True, allow_private_image_hosts=True, max_image_bytes=60_000) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        inline = ask(client, "data:image/png;base64," + base64.b64encode(picture).decode())
        assert ask(client, host + "/green.png") == inline
        with pytest.raises(openai.APIStatusError) as caught:
            ask(client, host + "/huge.bin")
        assert caught.value.status_code == 413
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, host + "/missing.png")
        assert "could not fetch" in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:
            ask(client, "file:///etc/passwd")
        assert "unsupported image URL scheme" in caught.value.message


def test_the_fast_quantized_pipeline_serves_the_same_answers_it_gives_in_python(tmp_path):
    from mobilevlm.fast.pipeline import FastPipeline

    fast = FastPipeline.from_pretrained(make_tiny_checkpoint(tmp_path / "tiny"), quantize="int8")
    with serve(fast) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        question = [{"role": "user", "content": "Tell me a long story."}]
        plain = client.chat.completions.create(model=MODEL, messages=question, max_tokens=12, temperature=0)
        streamed = client.chat.completions.create(model=MODEL, messages=question, max_tokens=12, temperature=0,
                                                  stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    expected = fast.generate(fast.build_prompt("Tell me a long story.", 0), max_new_tokens=12)
    assert plain.choices[0].message.content == expected == text.strip()


class FailsOnBoom(Pipeline):
    """The real pipeline, except that generation breaks down midway for prompts that contain BOOM."""

    def __init__(self, pipe):
        super().__init__(pipe.tokenizer, pipe.model, pipe.image_processor, pipe.context_len, pipe.conv_mode)

    def stream(self, prompt, images=None, **settings):
        if "BOOM" in prompt:
            yield "partial"
            raise RuntimeError("kaboom")
        yield from super().stream(prompt, images, **settings)


def test_a_failure_during_generation_is_reported_and_the_server_goes_on(pipe, caplog):
    with serve(FailsOnBoom(pipe)) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        boom = [{"role": "user", "content": "BOOM"}]
        with pytest.raises(openai.InternalServerError) as caught:
            client.chat.completions.create(model=MODEL, messages=boom, max_tokens=4)
        # the client learns a request id, not the exception: that goes to the server log, under the same id
        message = caught.value.message
        assert "internal error" in message and "kaboom" not in message and "RuntimeError" not in message
        request_id = message.split("request id ")[1].split(";")[0]
        assert any(request_id in r.getMessage() and "kaboom" in str(r.exc_info[1]) for r in caplog.records)
        with pytest.raises(openai.APIError, match="internal error") as caught:
            for _ in client.chat.completions.create(model=MODEL, messages=boom, max_tokens=4, stream=True):
                pass
        assert "kaboom" not in str(caught.value)
        reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=3, temperature=0)
        assert reply.choices[0].message.content == pipe.generate(pipe.build_prompt("Hi", 0), max_new_tokens=3)
        assert health(url)["pending"] == 0
