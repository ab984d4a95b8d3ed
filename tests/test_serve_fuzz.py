"""Property-based fuzzing of the HTTP API through the test client: hypothesis makes request bodies (chat requests
with odd fields, arbitrary JSON, raw bytes), headers and image payloads (real images in many formats and modes,
truncated or with flipped bytes); whatever comes in, the answer is never a 5xx and never hangs, and afterwards
the server still answers a normal request correctly. Fixed seed (derandomize) and a bounded number of examples."""
from __future__ import annotations

import base64
import io
import json
from concurrent.futures import ThreadPoolExecutor

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from starlette.testclient import TestClient

from mobilevlm.generation import Pipeline
from mobilevlm.serve.app import ServerSettings, create_app
from mobilevlm.testing import make_tiny_checkpoint

MODEL = "tiny"
ANSWER_TIMEOUT_S = 60  # "no hang": far above the slowest legitimate answer here (a few tokens of a tiny model)


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    return Pipeline.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def client(pipe):
    app = create_app(pipe, ServerSettings(model_name=MODEL, default_max_tokens=4, max_body_bytes=200_000,
                                          max_image_bytes=50_000, max_image_pixels=200 * 200, max_images=3,
                                          memory_budget_bytes=64 * 1024 * 1024, budget_wait_s=0.2))
    # a bug must show as a 500 response here (which the test refuses), not as an exception in the test client
    with TestClient(app, raise_server_exceptions=False) as client, ThreadPoolExecutor(1) as runner:
        yield client, runner


small_ints = st.integers(-3, 6)
huge_ints = st.sampled_from([2**31, 2**63, 2**64, -2**63 - 1, 10**30])
scalars = st.none() | st.booleans() | small_ints | huge_ints | st.floats() | st.text(max_size=12)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=12)


@st.composite
def image_files(draw) -> bytes:
    size = (draw(st.integers(1, 220)), draw(st.integers(1, 80)))
    mode = draw(st.sampled_from(["RGB", "RGBA", "L", "LA", "P", "1", "I;16", "CMYK"]))
    fmt = draw(st.sampled_from(["PNG", "JPEG", "GIF", "BMP", "WEBP", "TIFF"]))
    buffer = io.BytesIO()
    image = Image.new(mode, size)
    try:
        image.save(buffer, format=fmt)
    except (OSError, ValueError, KeyError):  # that format cannot hold that mode: an RGB PNG then
        buffer = io.BytesIO()
        image.convert("RGB").save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    damage = draw(st.sampled_from(["none", "none", "none", "truncate", "flip"]))
    at = draw(st.integers(0, len(data) - 1))
    if damage == "truncate":
        del data[at:]
    elif damage == "flip":
        data[at] ^= draw(st.integers(1, 255))
    return bytes(data)


image_urls = st.one_of(
    image_files().map(lambda b: "data:image/png;base64," + base64.b64encode(b).decode()),
    st.binary(max_size=64).map(lambda b: "data:image/jpeg;base64," + base64.b64encode(b).decode()),
    st.sampled_from(["data:image/png;base64,@@@", "data:,plain", "data:image/png;base64", "http://127.0.0.1:9/x.png",
                     "file:///etc/passwd", "", "data:image/png;base64," + "A" * 80_000]))
parts = st.one_of(st.fixed_dictionaries({"type": st.just("text"), "text": st.text(min_size=1, max_size=30)}),
                  st.fixed_dictionaries({"type": st.just("image_url"),
                                         "image_url": st.fixed_dictionaries({"url": image_urls})}))
turns = st.lists(st.fixed_dictionaries({"role": st.just("user"), "content": st.lists(parts, min_size=1, max_size=3)}),
                 min_size=1, max_size=3)
# Valid requests (answers of a few tokens: a long answer is the token budget's business, not the fuzzer's) ...
valid_requests = st.fixed_dictionaries(
    {"model": st.just(MODEL), "messages": turns},
    optional={"max_tokens": st.integers(1, 6), "temperature": st.floats(0, 2), "top_p": st.floats(0.01, 1),
              "stream": st.booleans(), "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
              "stop": st.text(max_size=4) | st.lists(st.text(min_size=1, max_size=4), max_size=4),
              "seed": st.integers() | huge_ints, "n": st.just(1), "user": st.text(max_size=8)})
# ... each with up to two fields (top-level, or in its first message or part) replaced by anything
fields = st.sampled_from(["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "stream",
                          "stream_options", "stop", "seed", "n", "tools", "logprobs", "0.role", "0.content",
                          "0.tool_calls", "0.0.type", "0.0.image_url", "0.0.text"])


@st.composite
def chat_requests(draw) -> dict:
    request = draw(valid_requests)
    mutations = st.lists(st.tuples(fields, json_values), min_size=1, max_size=2)
    for field, value in draw(st.integers(0, 2).flatmap(lambda i: mutations if i == 0 else st.just([]))):
        *path, key = field.split(".")
        try:
            target = request["messages"][0] if path else request
            (target["content"][0] if len(path) > 1 else target)[key] = value
        except (TypeError, KeyError, IndexError):  # an earlier replacement took that place away
            pass
    return request


bodies = st.one_of(chat_requests().map(lambda r: json.dumps(r).encode()),  # NaN, Infinity as Python writes them
                   json_values.map(lambda v: json.dumps(v).encode()),
                   st.binary(max_size=300))
header_text = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=30)
content_types = st.sampled_from(["application/json"] * 8 + ["application/json; charset=utf-8", "Application/JSON",
                                 " application/json ;charset=latin-1", "application/json, text/plain", "text/plain",
                                 "multipart/form-data; boundary=x", "application/x-www-form-urlencoded", ""])
extra_headers = st.dictionaries(st.sampled_from(["Authorization", "Origin", "Accept", "Content-Encoding",
                                                 "Transfer-Encoding", "X-Anything", "Access-Control-Request-Method"]),
                                header_text, max_size=2)
routes = st.sampled_from([("POST", "/v1/chat/completions")] * 20 + [
    ("GET", "/v1/chat/completions"), ("OPTIONS", "/v1/chat/completions"), ("POST", "/v1/models"), ("GET", "/health"),
    ("GET", "/v1/models/tiny"), ("DELETE", "/"), ("POST", "/static/app.js")])


@settings(derandomize=True, max_examples=300, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(route=routes, body=bodies, content_type=content_types, headers=extra_headers)
def test_no_request_makes_the_server_fail_or_hang(client, route, body, content_type, headers):
    http, runner = client
    method, path = route
    headers = {**headers, "Content-Type": content_type}
    response = runner.submit(http.request, method, path, content=body, headers=headers).result(ANSWER_TIMEOUT_S)
    assert response.status_code < 500, response.text
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        assert '"server_error"' not in response.text and response.text.endswith("data: [DONE]\n\n")
    elif response.status_code >= 400:
        assert response.json()["error"]["message"]


def test_after_fuzzing_a_normal_request_is_answered(client, pipe):
    # runs after the fuzz test (file order): the queue, the budget and the model are all still in working order
    http, _ = client
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Where is the cat?"}], "max_tokens": 6}
    response = http.post("/v1/chat/completions", json=body)
    assert response.status_code == 200
    assert response.json()["choices"][0]["message"]["content"] == pipe.generate(
        pipe.build_prompt("Where is the cat?", 0), max_new_tokens=6)
    health = http.get("/health").json()
    assert health["queue"]["pending"] == 0 and health["memory"]["used_bytes"] == 0
