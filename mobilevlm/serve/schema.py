"""The request body of `POST /v1/chat/completions` (the subset of OpenAI's chat format this server honours).

Unknown fields are ignored, as OpenAI clients send many optional ones; the few that would change the meaning
of the answer and are not supported (n > 1, tools, logprobs) are refused instead of silently dropped.
"""
from __future__ import annotations

import json
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from mobilevlm.serve.apierror import ApiError


MIN_TEMPERATURE = 1e-5  # below it a request is answered greedily (docs/serving.md)


class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")


class ImageURL(_Lenient):
    url: str
    detail: str | None = None


class TextPart(_Lenient):
    type: Literal["text"]
    text: str


class ImagePart(_Lenient):
    type: Literal["image_url"]
    image_url: ImageURL

    @field_validator("image_url", mode="before")
    @classmethod
    def _bare_string(cls, value):  # some clients send the URL itself rather than {"url": ...}
        return {"url": value} if isinstance(value, str) else value


Part = Annotated[Union[TextPart, ImagePart], Field(discriminator="type")]


class Message(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[Part] | None = None
    tool_calls: list | None = None


class StreamOptions(_Lenient):
    include_usage: bool = False


class ChatRequest(_Lenient):
    model: str
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-2**63, lt=2**64)  # what torch.manual_seed takes
    n: int = 1
    tools: list | None = None
    functions: list | None = None
    logprobs: bool | None = None

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, value):
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @field_validator("temperature")
    @classmethod
    def _greedy_below_the_smallest(cls, value):
        # dividing the logits by a temperature this small overflows them (NaN probabilities); the sampled answer
        # would be the greedy one anyway
        return 0.0 if value is not None and value < MIN_TEMPERATURE else value

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


def _is_type_label(loc_item) -> bool:
    """pydantic names the union alternative it tried ('str', 'list[...]') in an error's location."""
    return isinstance(loc_item, str) and ("[" in loc_item or loc_item in ("str", "int", "float", "bool"))


def parse_chat_request(body: bytes) -> ChatRequest:
    """The validated request, or ApiError(400) naming the offending field."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ApiError(400, f"request body is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        request = ChatRequest.model_validate(data)
    except ValidationError as err:
        # a union reports one error per alternative; the deepest one is about what the client meant to send
        error = max(err.errors(), key=lambda e: len(e["loc"]))
        loc = [str(p) for p in error["loc"] if not _is_type_label(p)]
        # a tagged union repeats the tag ("image_url") before the field of the same name: say it once
        param = ".".join(p for i, p in enumerate(loc) if i + 1 == len(loc) or loc[i + 1] != p)
        raise ApiError(400, f"{param}: {error['msg']}" if param else error["msg"], param=param or None) from None
    if request.n != 1:
        raise ApiError(400, "n: only n=1 is supported", param="n")
    if request.tools or request.functions:
        raise ApiError(400, "tools / function calling is not supported by this model", param="tools")
    if request.logprobs:
        raise ApiError(400, "logprobs are not supported", param="logprobs")
    return request
