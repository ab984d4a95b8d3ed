"""Rendering OpenAI messages into the v1 template, and decoding image URLs (no model, no server)."""
from __future__ import annotations

import base64
import http.server
import io
import socket
import threading
import time
import urllib.request

import pytest
from PIL import Image

from mobilevlm.conversation import VICUNA_V1_SYSTEM, get_conv_template
from mobilevlm.serve.apierror import ApiError
from mobilevlm.serve import images
from mobilevlm.serve.images import check_remote_host, decode_data_url, fetch_image
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
    assert loaded.data == picture.getvalue() and (loaded.width, loaded.height) == (3, 2)
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


@pytest.fixture
def fake_dns(monkeypatch):
    table = {"public.test": ["93.184.216.34"], "metadata.test": ["169.254.169.254"],
             "mixed.test": ["93.184.216.34", "10.1.2.3"], "v6local.test": ["::1"],
             "mapped.test": ["::ffff:10.0.0.1"], "sixtofour.test": ["2002:a9fe:a9fe::1"],
             "nat64.test": ["64:ff9b::a9fe:a9fe"], "compat.test": ["::7f00:1"], "public6.test": ["2606:4700::1111"]}

    def getaddrinfo(host, port, *args, **kwargs):
        if host not in table:
            raise socket.gaierror("unknown host")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (address, port)) for address in table[host]]
    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_remote_hosts_must_resolve_to_public_addresses_only(fake_dns):
    check_remote_host("http://public.test/cat.png", "m", allow_private=False)
    check_remote_host("http://public6.test/cat.png", "m", allow_private=False)
    for host in ("metadata.test", "mixed.test", "v6local.test", "mapped.test", "sixtofour.test", "nat64.test",
                 "compat.test"):
        with pytest.raises(ApiError, match="non-public address") as caught:
            check_remote_host(f"https://{host}/x.png", "messages[0]", allow_private=False)
        assert caught.value.status == 400
        check_remote_host(f"https://{host}/x.png", "m", allow_private=True)
    with pytest.raises(ApiError, match="cannot resolve"):
        check_remote_host("http://nowhere.test/x.png", "m", allow_private=False)
    with pytest.raises(ApiError, match="not an http"):
        check_remote_host("ftp://public.test/x.png", "m", allow_private=False)


def test_a_redirect_to_a_private_address_is_refused(fake_dns):
    handler = images._CheckedRedirects("messages[0]", allow_private=False)
    request = urllib.request.Request("http://public.test/cat.png")
    with pytest.raises(ApiError, match="non-public"):
        handler.redirect_request(request, None, 302, "Found", {}, "http://metadata.test/latest/meta-data")
    followed = handler.redirect_request(request, None, 302, "Found", {}, "http://public.test/other.png")
    assert followed.full_url == "http://public.test/other.png"


class _BrokenImageHandler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        if self.path == "/truncated":  # promises 1000 bytes, sends 10 and hangs up
            self.send_header("Content-Length", "1000")
            self.end_headers()
            self.wfile.write(b"0123456789")
        else:  # drips a byte at a time
            self.end_headers()
            for _ in range(50):
                self.wfile.write(b"x")
                self.wfile.flush()
                threading.Event().wait(0.05)

    def log_message(self, *args):
        pass


class _DripHandler(http.server.BaseHTTPRequestHandler):
    """Sends a byte every 0.1 s for 6 s: never idle long enough for a socket timeout."""

    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        for _ in range(60):
            try:
                self.wfile.write(b"x")
                self.wfile.flush()
            except OSError:  # the client gave up
                return
            threading.Event().wait(0.1)

    def log_message(self, *args):
        pass


def test_truncated_and_slow_downloads_are_client_errors(monkeypatch):
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _BrokenImageHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    monkeypatch.setattr(images, "FETCH_TIMEOUT_S", 1)
    monkeypatch.setattr(images, "_CHUNK", 1)
    try:
        with pytest.raises(ApiError, match="could not fetch") as caught:
            images.fetch_url(base + "/truncated", "m", 10_000, allow_private=True)
        assert caught.value.status == 400
        with pytest.raises(ApiError, match="longer than 1 s") as caught:
            images.fetch_url(base + "/slow", "m", 10_000, allow_private=True)
        assert caught.value.status == 400
    finally:
        httpd.shutdown()


def test_the_download_deadline_holds_while_bytes_keep_trickling_in(monkeypatch):
    """A chunk read waits for the whole chunk; the deadline must be checked between network reads."""
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _DripHandler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    monkeypatch.setattr(images, "FETCH_TIMEOUT_S", 1)
    try:
        started = time.monotonic()
        with pytest.raises(ApiError, match="longer than 1 s"):
            images.fetch_url(f"http://127.0.0.1:{httpd.server_address[1]}/drip", "m", 10_000, allow_private=True)
        assert time.monotonic() - started < 3
    finally:
        httpd.shutdown()
