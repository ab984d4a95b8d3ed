"""The web chat page in headless Chromium (Debian's `chromium` package, driven by Playwright)."""
from __future__ import annotations

import base64
import io
import os
import shutil
import time

import httpx
import pytest
from PIL import Image

CHROMIUM = os.environ.get("MOBILEVLM_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
if not os.path.exists(CHROMIUM):
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
openai = pytest.importorskip("openai")

from mobilevlm.generation import Pipeline  # noqa: E402
from mobilevlm.serve.app import ServerSettings, create_app  # noqa: E402
from mobilevlm.serve.background import BackgroundServer  # noqa: E402
from mobilevlm.testing import make_tiny_checkpoint  # noqa: E402

KEY = "page-key"


def png(color) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 32), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    pipe = Pipeline.from_pretrained(make_tiny_checkpoint(tmp_path_factory.mktemp("tiny")))
    with BackgroundServer(create_app(pipe, ServerSettings(model_name="tiny", api_key=KEY))) as url:
        yield url


@pytest.fixture(scope="module")
def page(server):
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--headless", "--no-sandbox", "--disable-gpu"])
        # the server wants the key on every route: the browser sends it as HTTP Basic credentials
        context = browser.new_context(http_credentials={"username": "me", "password": KEY})
        page = context.new_page()
        page.set_default_timeout(15_000)
        page.goto(server + "/")
        page.wait_for_selector("body[data-state=idle]")
        page.click("summary")  # opens the settings (max tokens)
        yield page
        browser.close()


def api_answer(server, messages, max_tokens, stream=False):
    client = openai.OpenAI(base_url=server + "/v1", api_key=KEY, max_retries=0)
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0, max_tokens=max_tokens,
                                           stream=stream)
    if stream:
        return [c.choices[0].delta.content for c in reply if c.choices and c.choices[0].delta.content]
    return reply.choices[0].message.content


def ask(page, question: str, max_tokens: int, answers_before: int, press_enter: bool = False):
    page.fill("#max-tokens", str(max_tokens))
    page.fill("#question", question)
    page.press("#question", "Enter") if press_enter else page.click("#send")
    page.wait_for_function(f"document.body.dataset.state === 'idle' && "
                           f"document.querySelectorAll('.msg.assistant, .msg.error').length > {answers_before}")
    return page.locator("#messages .msg").last


def test_image_question_then_follow_up(page, server):
    assert page.inner_text("#model-name") == "tiny"
    red = png((220, 20, 20))
    page.set_input_files("#image-input", files=[{"name": "red.png", "mimeType": "image/png", "buffer": red}])
    page.wait_for_selector("#pending-images img")
    first = ask(page, "What is in the image?", 12, 0)
    assert "assistant" in first.get_attribute("class")
    assert page.locator(".msg.user img").count() == 1
    url = "data:image/png;base64," + base64.b64encode(red).decode()
    turn1 = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}},
                                          {"type": "text", "text": "What is in the image?"}]}]
    expected1 = api_answer(server, turn1, 12)
    assert first.inner_text().strip() == expected1

    assert page.is_hidden("#stop")
    second = ask(page, "What colour is it?", 8, 1, press_enter=True)
    turn2 = turn1 + [{"role": "assistant", "content": expected1}, {"role": "user", "content": "What colour is it?"}]
    assert second.inner_text().strip() == api_answer(server, turn2, 8)


def test_bad_image_shows_the_error_and_the_chat_goes_on(page, server):
    page.click("#new-chat")
    assert page.locator("#messages .msg").count() == 0
    page.set_input_files("#image-input", files=[{"name": "notes.png", "mimeType": "image/png",
                                                 "buffer": b"this is not a picture"}])
    error = ask(page, "What is this?", 5, 0)
    assert "error" in error.get_attribute("class") and "not an image" in error.inner_text()
    # count the page's updates while the answer comes in
    page.evaluate("""() => { window.updates = 0;
        new MutationObserver((records) => window.updates += records.length).observe(
            document.getElementById('messages'), {subtree: true, characterData: true, childList: true}); }""")
    answer = ask(page, "Tell me a long story.", 40, 1)
    assert "assistant" in answer.get_attribute("class")
    messages = [{"role": "user", "content": "Tell me a long story."}]
    assert answer.inner_text().strip() == api_answer(server, messages, 40)
    pieces = api_answer(server, messages, 40, stream=True)
    assert len(pieces) > 3
    # two bubbles added, then the answer's text replaced once per streamed piece
    assert page.evaluate("window.updates") >= 2 + len(pieces)


def test_stop_button_cancels_the_generation_on_the_server(page, server):
    page.click("#new-chat")
    page.fill("#max-tokens", "1000")
    page.fill("#question", "Tell me a long story.")
    page.click("#send")
    page.wait_for_function("document.querySelector('.msg.assistant .text')?.textContent.length > 0")
    page.click("#stop")
    page.wait_for_selector("body[data-state=idle]")
    assert page.is_hidden("#stop")
    deadline = time.monotonic() + 10
    while httpx.get(server + "/health", auth=("me", KEY)).json()["queue"]["cancelled"] < 1:
        assert time.monotonic() < deadline, "the server did not cancel the stopped answer"
        time.sleep(0.05)
    # what was said before Stop stays in the history, and the chat goes on
    answer = ask(page, "Hello world!", 4, 1)
    assert "assistant" in answer.get_attribute("class")
