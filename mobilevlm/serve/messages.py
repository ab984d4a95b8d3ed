"""OpenAI chat messages -> one prompt in the model's conversation template, plus its images in order.

Rules (docs/serving.md tells users the same):
- system (and "developer") messages replace the template's built-in system prompt; several are joined with
  newlines in order. Without one, the template's own system prompt (the one the model was trained with) is kept.
- a user message's parts are joined with newlines, each image becoming an `<image>` tag where it stands, so
  [image, text] gives the trained "<image>\\nquestion" layout. Images from earlier turns stay in the prompt.
- consecutive messages of the same role are merged; the conversation must start with the user (after any
  system messages) and end with a user message for the assistant to answer.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from mobilevlm.constants import DEFAULT_IMAGE_TOKEN
from mobilevlm.conversation import Conversation
from mobilevlm.serve.apierror import ApiError
from mobilevlm.serve.pixels import ImageFile
from mobilevlm.serve.schema import ImagePart, Message

ImageFetcher = Callable[[str, str], ImageFile]  # (url, field name) -> the image's file, header checked


@dataclass
class RenderedPrompt:
    prompt: str
    images: list[ImageFile]


def _text_only(message: Message, where: str) -> str:
    if message.content is None:
        return ""
    if isinstance(message.content, str):
        return message.content
    if any(isinstance(part, ImagePart) for part in message.content):
        raise ApiError(400, f"{where}: images are only accepted in user messages", param=where)
    return "\n".join(part.text for part in message.content)


def _check_text(text: str, where: str) -> str:
    if DEFAULT_IMAGE_TOKEN in text:
        raise ApiError(400, f"{where}: the text contains the reserved tag {DEFAULT_IMAGE_TOKEN}; send images as "
                            "image_url parts", param=where)
    return text


def _user_text(message: Message, where: str, fetch: ImageFetcher, images: list[ImageFile], max_images: int) -> str:
    if message.content is None:
        raise ApiError(400, f"{where}.content: a user message needs content", param=f"{where}.content")
    if isinstance(message.content, str):
        return _check_text(message.content, f"{where}.content")
    pieces = []
    for j, part in enumerate(message.content):
        field = f"{where}.content.{j}"
        if isinstance(part, ImagePart):
            if len(images) >= max_images:
                raise ApiError(400, f"{field}: more than {max_images} images in one request", param=field)
            images.append(fetch(part.image_url.url, f"{field}.image_url"))
            pieces.append(DEFAULT_IMAGE_TOKEN)
        else:
            pieces.append(_check_text(part.text, f"{field}.text"))
    return "\n".join(pieces)


def render_messages(messages: list[Message], template: Conversation, fetch: ImageFetcher,
                    max_images: int) -> RenderedPrompt:
    """The prompt for the assistant's next reply; `template` is a fresh copy and is filled in place."""
    system: list[str] = []
    turns: list[list[str]] = []  # [role, text], same-role neighbours merged
    images: list[ImageFile] = []
    for i, message in enumerate(messages):
        where = f"messages.{i}"
        if message.role in ("system", "developer"):
            system.append(_check_text(_text_only(message, where), f"{where}.content"))
            continue
        if message.role == "user":
            role, text = template.roles[0], _user_text(message, where, fetch, images, max_images)
        elif message.role == "assistant":
            if message.tool_calls:
                raise ApiError(400, f"{where}.tool_calls: tool calls are not supported", param=f"{where}.tool_calls")
            role, text = template.roles[1], _check_text(_text_only(message, where), f"{where}.content")
        else:
            raise ApiError(400, f"{where}.role: role {message.role!r} is not supported (no tool use)",
                           param=f"{where}.role")
        if not text.strip():  # the template cannot hold an empty turn (it would lose its separator)
            raise ApiError(400, f"{where}.content: the message is empty", param=f"{where}.content")
        if not turns and role != template.roles[0]:
            raise ApiError(400, f"{where}: the conversation must start with a user message", param=where)
        if turns and turns[-1][0] == role:
            turns[-1][1] += "\n" + text
        else:
            turns.append([role, text])
    if not turns or turns[-1][0] != template.roles[0]:
        raise ApiError(400, "messages: the last message must be from the user", param="messages")
    if system:
        template.system = "\n".join(system)
    for role, text in turns:
        template.append_message(role, text)
    template.append_message(template.roles[1], None)
    return RenderedPrompt(template.get_prompt(), images)
