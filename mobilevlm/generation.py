"""The Python inference API: `Pipeline` (one-shot, streaming, batched generation) and `Chat` (multi-turn).

    pipe = Pipeline.from_pretrained("path/to/MobileVLM_V2-1.7B")
    pipe.generate(pipe.build_prompt("What is in the image?"), images=[load_image("cat.jpg")])

Prompts are full template strings with one `<image>` tag per image (`build_prompt` makes them). Decoding is
transformers' `generate` on the spliced embeddings; it stops at EOS and at the stop strings (by default the
template's own: "</s>" for v1, "###" for v0, "\n" for plain), which are cut from the returned text.
"""
from __future__ import annotations

import queue
import threading
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
from PIL import Image
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from mobilevlm.constants import DEFAULT_IMAGE_TOKEN
from mobilevlm.conversation import Conversation, get_conv_template
from mobilevlm.errors import PromptError
from mobilevlm.processing import ImageSource, load_image, pads_images, process_images, tokenizer_image_token


@dataclass
class GenerationSettings:
    temperature: float = 0.0
    top_p: float | None = None
    num_beams: int = 1
    max_new_tokens: int = 512
    stop: Sequence[str] = field(default_factory=tuple)

    def generate_kwargs(self) -> dict:
        kwargs = dict(max_new_tokens=self.max_new_tokens, num_beams=self.num_beams, do_sample=self.temperature > 0)
        if self.temperature > 0:
            kwargs.update(temperature=self.temperature, top_p=self.top_p if self.top_p is not None else 1.0, top_k=0)
        return kwargs


class _StopOnStrings(StoppingCriteria):
    """Stops each sequence once its decoded continuation contains one of the stop strings."""

    def __init__(self, tokenizer, stops: Sequence[str]):
        self.tokenizer, self.stops = tokenizer, [s for s in stops if s]
        self.start: int | None = None

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if self.start is None:  # first call: one new token; text-only prompts put their ids in front of it
            self.start = input_ids.shape[1] - 1
        done = [any(s in self.tokenizer.decode(row[self.start:][-32:]) for s in self.stops) for row in input_ids]
        return torch.tensor(done, device=input_ids.device)


class KeywordsStoppingCriteria(StoppingCriteria):
    """The original's stop criterion, for one sequence at a time: `model.generate(..., stopping_criteria=[
    KeywordsStoppingCriteria([stop_str], tokenizer, input_ids)])`. It stops when the sequence ends with a
    keyword's token ids, or when the text of the last new tokens (at most as many as the longest keyword has)
    contains a keyword. `input_ids` is the prompt; new tokens are counted from its length."""

    def __init__(self, keywords: Sequence[str], tokenizer, input_ids: torch.Tensor):
        self.keywords, self.tokenizer = list(keywords), tokenizer
        self.keyword_ids = []
        for keyword in self.keywords:
            ids = tokenizer(keyword).input_ids
            if len(ids) > 1 and ids[0] == tokenizer.bos_token_id:
                ids = ids[1:]
            self.keyword_ids.append(torch.tensor(ids))
        self.max_keyword_len = max((len(ids) for ids in self.keyword_ids), default=0)
        self.start_len = input_ids.shape[1]

    def __call__(self, output_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        if output_ids.shape[0] != 1:
            raise ValueError("KeywordsStoppingCriteria takes one sequence at a time (as the original)")
        done = any(torch.equal(output_ids[0, -len(ids):], ids.to(output_ids.device)) for ids in self.keyword_ids)
        if not done:
            offset = min(output_ids.shape[1] - self.start_len, self.max_keyword_len)
            text = self.tokenizer.batch_decode(output_ids[:, -offset:], skip_special_tokens=True)[0]
            done = any(keyword in text for keyword in self.keywords)
        return torch.full((1,), done, dtype=torch.bool, device=output_ids.device)


class _Cancelled(StoppingCriteria):
    """Ends generation when the consumer of a stream goes away (a client disconnect frees the model)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), device=input_ids.device)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text


class _QueueStreamer(BaseStreamer):
    def __init__(self):
        self.queue: queue.Queue = queue.Queue()
        self.first = True

    def put(self, value: torch.Tensor) -> None:
        if self.first:  # the prompt (empty when generating from embeddings)
            self.first = False
            return
        self.queue.put(value.reshape(-1).tolist())

    def end(self) -> None:
        self.queue.put(None)


class Pipeline:
    def __init__(self, tokenizer, model, image_processor, context_len: int, conv_mode: str = "v1"):
        self.tokenizer, self.model, self.image_processor = tokenizer, model, image_processor
        self.context_len = context_len
        self.conv_mode = conv_mode
        # How images are squared before the CLIP processor: the checkpoint's setting ("pad"), or None for the
        # processor's own resize + centre crop (what the original's ScienceQA evaluation feeds).
        self.image_aspect_ratio = "pad" if pads_images(model.config) else None
        self.lock = threading.Lock()  # one generation at a time per model (the server relies on this)

    @classmethod
    def from_pretrained(cls, model_path, device: str = "cpu", dtype=None, load_8bit: bool = False,
                        load_4bit: bool = False, conv_mode: str = "v1") -> "Pipeline":
        from mobilevlm.model.loading import load_pretrained_model

        tokenizer, model, image_processor, context_len = load_pretrained_model(
            model_path, load_8bit=load_8bit, load_4bit=load_4bit, device=device, dtype=dtype)
        return cls(tokenizer, model, image_processor, context_len, conv_mode)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def is_multimodal(self) -> bool:
        return self.image_processor is not None

    def conversation(self, conv_mode: str | None = None) -> Conversation:
        return get_conv_template(conv_mode or self.conv_mode)

    def build_prompt(self, question: str, num_images: int = 1, conv_mode: str | None = None) -> str:
        """The template prompt for one user turn, with `num_images` `<image>` tags in front of the question."""
        conv = self.conversation(conv_mode)
        tags = (DEFAULT_IMAGE_TOKEN + "\n") * num_images
        conv.append_message(conv.roles[0], tags + question)
        conv.append_message(conv.roles[1], None)
        return conv.get_prompt()

    def pixel_values(self, images: Sequence[ImageSource | torch.Tensor]) -> torch.Tensor | None:
        """The model's pixel input for `images`. Files and bytes are photos (EXIF orientation applied); a PIL image
        is used as its caller opened it (evaluation: without EXIF, as the official scripts), only brought to RGB; a
        tensor is taken as this method's own output for one image (the server queues images in that form)."""
        if not images:
            return None
        if not self.is_multimodal:
            raise PromptError("this is a text-only model; it takes no images")
        parts = [image.reshape(1, *image.shape[-3:]) if isinstance(image, torch.Tensor)
                 else process_images([load_image(image)], self.image_processor, self.image_aspect_ratio) for image in images]
        return torch.cat(parts).to(self.device, self.model.dtype)

    def encode(self, prompt: str, images: Sequence[ImageSource] | None, max_new_tokens: int) -> tuple[list[int], torch.Tensor | None, int]:
        """Token ids (with -200 placeholders), pixel values, and the new-token budget left by the context."""
        images = list(images or [])
        tags = prompt.count(DEFAULT_IMAGE_TOKEN)
        if tags != len(images):
            raise PromptError(f"the prompt has {tags} <image> tag(s) but {len(images)} image(s) were given")
        pixels = self.pixel_values(images)  # first: a text-only model has no image-token count to ask for
        ids = tokenizer_image_token(prompt, self.tokenizer)
        length = len(ids) + len(images) * (self.model.config.num_image_tokens - 1) if images else len(ids)
        if length >= self.context_len:
            raise PromptError(f"the prompt is {length} tokens (images included); the model's context is {self.context_len}")
        return ids, pixels, min(max_new_tokens, self.context_len - length)

    def _generate_ids(self, ids_batch: list[list[int]], pixels: torch.Tensor | None, settings: GenerationSettings,
                      budget: int, streamer=None, cancel: threading.Event | None = None) -> torch.Tensor:
        longest = max(len(ids) for ids in ids_batch)
        pad = self.tokenizer.pad_token_id
        input_ids = torch.tensor([[pad] * (longest - len(ids)) + ids for ids in ids_batch], device=self.device)
        mask = torch.tensor([[0] * (longest - len(ids)) + [1] * len(ids) for ids in ids_batch], device=self.device)
        kwargs = settings.generate_kwargs()
        kwargs["max_new_tokens"] = budget
        criteria = StoppingCriteriaList()
        if settings.stop:
            criteria.append(_StopOnStrings(self.tokenizer, settings.stop))
        if cancel is not None:
            criteria.append(_Cancelled(cancel))
        if criteria:
            kwargs["stopping_criteria"] = criteria
        with self.lock, torch.inference_mode():
            output = self.model.generate(input_ids, images=pixels, attention_mask=mask, pad_token_id=pad,
                                         eos_token_id=self.tokenizer.eos_token_id, streamer=streamer, **kwargs)
        return output[:, input_ids.shape[1]:]  # the model returns the prompt in front, as the original

    def _settings(self, settings: dict) -> GenerationSettings:
        if isinstance(settings.get("stop"), str):  # one stop string, not a sequence of characters
            settings["stop"] = (settings["stop"],)
        if settings.get("stop") is None:
            # the template's stop string ends the answer, as the original's KeywordsStoppingCriteria([stop_str])
            settings["stop"] = (self.conversation().stop_str,)
        return GenerationSettings(**settings)

    def _decode(self, ids: Sequence[int], stops: Sequence[str]) -> str:
        text = self.tokenizer.decode(ids, skip_special_tokens=True)  # also drops the padding after EOS
        return _cut_at_stop(text, stops).strip()

    def generate(self, prompt: str, images: Sequence[ImageSource] | None = None, **settings) -> str:
        settings = self._settings(settings)
        ids, pixels, budget = self.encode(prompt, images, settings.max_new_tokens)
        output = self._generate_ids([ids], pixels, settings, budget)
        return self._decode(output[0].tolist(), settings.stop)

    def generate_batch(self, requests: Sequence[tuple[str, Sequence[ImageSource] | None]], **settings) -> list[str]:
        """Several (prompt, images) pairs in one left-padded batch; greedy results equal one-by-one generation."""
        settings = self._settings(settings)
        encoded = [self.encode(prompt, images, settings.max_new_tokens) for prompt, images in requests]
        pixels = [p for _, p, _ in encoded if p is not None]
        output = self._generate_ids([ids for ids, _, _ in encoded], torch.cat(pixels) if pixels else None, settings,
                                    min(budget for _, _, budget in encoded))
        return [self._decode(row.tolist(), settings.stop) for row in output]

    def stream(self, prompt: str, images: Sequence[ImageSource] | None = None, **settings) -> Iterator[str]:
        """Yields the answer in pieces as it is generated; the pieces join to `generate`'s result (unstripped)."""
        settings = self._settings(settings)
        ids, pixels, budget = self.encode(prompt, images, settings.max_new_tokens)
        streamer = _QueueStreamer()
        cancel = threading.Event()
        failure: list[BaseException] = []

        def work():
            try:
                self._generate_ids([ids], pixels, settings, budget, streamer, cancel)
            except BaseException as err:  # re-raised in the consumer
                failure.append(err)
                streamer.end()

        thread = threading.Thread(target=work, daemon=True)
        thread.start()
        try:
            yield from self._stream_text(streamer, [s for s in settings.stop if s])
        finally:
            cancel.set()
            thread.join()
        if failure:
            raise failure[0]

    def _stream_text(self, streamer: _QueueStreamer, stops: list[str]) -> Iterator[str]:
        tokens: list[int] = []
        sent = ""
        finished = False
        while not finished:
            item = streamer.queue.get()
            finished = item is None
            tokens.extend(t for t in item or [] if t != self.tokenizer.eos_token_id)
            full = self.tokenizer.decode(tokens, skip_special_tokens=True)
            text = _cut_at_stop(full, stops)
            finished = finished or text != full
            if not finished:
                if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
                    continue
                # hold back a tail that may be the start of a stop string
                held = max((k for s in stops for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
                text = text[: len(text) - held]
            if len(text) > len(sent) and text.startswith(sent):
                yield text[len(sent):]
                sent = text

    def chat(self, conv_mode: str | None = None) -> "Chat":
        return Chat(self, conv_mode)


class Chat:
    """A multi-turn conversation: images can be added at any turn; history is kept in the template."""

    def __init__(self, pipeline: Pipeline, conv_mode: str | None = None):
        self.pipeline = pipeline
        self.conv = pipeline.conversation(conv_mode)
        self.images: list[Image.Image] = []

    def _prepare(self, text: str, images: Sequence[ImageSource]) -> str:
        new = [image if isinstance(image, Image.Image) else load_image(image) for image in images]
        self.images.extend(new)
        self.conv.append_message(self.conv.roles[0], (DEFAULT_IMAGE_TOKEN + "\n") * len(new) + text)
        self.conv.append_message(self.conv.roles[1], None)
        return self.conv.get_prompt()

    def _finish(self, answer: str) -> str:
        self.conv.messages[-1][1] = answer.strip()
        return answer.strip()

    def ask(self, text: str, images: Sequence[ImageSource] = (), **settings) -> str:
        prompt = self._prepare(text, images)
        try:
            return self._finish(self.pipeline.generate(prompt, self.images, **{"stop": [self.conv.stop_str], **settings}))
        except Exception:
            self._rollback(len(images))
            raise

    def ask_stream(self, text: str, images: Sequence[ImageSource] = (), **settings) -> Iterator[str]:
        prompt = self._prepare(text, images)
        pieces, finished = [], False
        try:
            for piece in self.pipeline.stream(prompt, self.images, **{"stop": [self.conv.stop_str], **settings}):
                pieces.append(piece)
                yield piece
            finished = True
        finally:  # an error, or a consumer that stops reading (GeneratorExit), leaves no half turn behind
            if finished:
                self._finish("".join(pieces))
            else:
                self._rollback(len(images))

    def _rollback(self, new_images: int) -> None:
        del self.conv.messages[-2:]
        if new_images:
            del self.images[-new_images:]


def inference_once(args) -> str:
    """The seed README's `inference_once(args)`: args has model_path, image_file, prompt, conv_mode,
    temperature, top_p, num_beams, max_new_tokens, load_8bit, load_4bit. Prints and returns the answer."""
    device = getattr(args, "device", None) or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = Pipeline.from_pretrained(args.model_path, device=device, load_8bit=getattr(args, "load_8bit", False),
                                    load_4bit=getattr(args, "load_4bit", False),
                                    conv_mode=getattr(args, "conv_mode", None) or "v1")
    image_file = getattr(args, "image_file", None)
    images = [image_file] if image_file else []
    prompt = pipe.build_prompt(args.prompt, num_images=len(images))
    answer = pipe.generate(prompt, images, temperature=getattr(args, "temperature", 0) or 0,
                           top_p=getattr(args, "top_p", None), num_beams=getattr(args, "num_beams", 1) or 1,
                           max_new_tokens=getattr(args, "max_new_tokens", 512) or 512)
    print(answer)
    return answer
