"""lmms-eval model plug-in, registered as `mobilevlm` (install the `lmms` extra).

    python -m lmms_eval --model mobilevlm --model_args pretrained=path/to/model,conv_template=v1 --tasks pope

lmms-eval finds it through the `lmms_eval.models` entry point (`manifests` below). It is a "simple"
model: it gets the task's context text and images, applies the MobileVLM template itself (one
`<image>` tag per image in front of the text, as the original) and decodes with the task's settings.
Note that lmms-eval's own tasks use their own prompts and parsers, which are not the LLaVA protocol of
the published numbers (see docs/evaluation.md); `mobilevlm eval` is the way to reproduce those.
"""
from __future__ import annotations

from typing import Any

from lmms_eval.api.model import lmms

from mobilevlm.constants import DEFAULT_IMAGE_TOKEN, IGNORE_INDEX

DEFAULT_MAX_NEW_TOKENS = 1024


def manifests():
    """Entry-point payload: the `mobilevlm` model id and where its class lives."""
    from lmms_eval.models.registry_v2 import ModelManifest

    return [ModelManifest(model_id="mobilevlm", simple_class_path=f"{__name__}.MobileVLM")]


def _images(visuals: Any) -> list:
    """doc_to_visual may return one image, a list, or nested lists; keep the PIL images in order."""
    from PIL import Image

    if visuals is None:
        return []
    if isinstance(visuals, Image.Image):
        return [visuals.convert("RGB")]
    found = []
    for visual in visuals:
        found.extend(_images(visual))
    return found


class MobileVLM(lmms):
    is_simple = True

    def __init__(self, pretrained: str, device: str = "cpu", dtype: str | None = None, conv_template: str = "v1",
                 batch_size: int | str = 1, max_batch_size: int | None = None, **kwargs) -> None:
        """`max_batch_size` is accepted because lmms-eval may pass it to every model; batches here have
        the fixed `batch_size`."""
        super().__init__()
        if kwargs:
            raise TypeError(f"unknown mobilevlm model_args: {', '.join(sorted(kwargs))}")
        from mobilevlm.generation import Pipeline

        self.pipe = Pipeline.from_pretrained(pretrained, device=device, dtype=dtype, conv_mode=conv_template)
        self.batch_size_per_gpu = int(batch_size)

    def _request_inputs(self, context: str, doc_to_visual, doc_id, task, split) -> tuple[str, list]:
        images = _images(doc_to_visual(self.task_dict[task][split][doc_id])) if doc_to_visual else []
        if not self.pipe.is_multimodal:
            images = []
        text = context.replace(DEFAULT_IMAGE_TOKEN, "").strip() if images else context
        return self.pipe.build_prompt(text, num_images=len(images)), images

    @staticmethod
    def _settings(gen_kwargs: dict) -> dict:
        until = gen_kwargs.get("until") or []
        temperature = gen_kwargs.get("temperature", 0) or 0
        if not gen_kwargs.get("do_sample", temperature > 0):
            temperature = 0
        return dict(temperature=temperature, top_p=gen_kwargs.get("top_p"), num_beams=gen_kwargs.get("num_beams", 1) or 1,
                    max_new_tokens=gen_kwargs.get("max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
                    stop=[until] if isinstance(until, str) else list(until))

    def generate_until(self, requests) -> list[str]:
        results: list[str] = []
        pending: list[tuple[str, list]] = []
        pending_settings: dict | None = None

        def flush():
            if pending:
                results.extend(self.pipe.generate_batch(pending, **pending_settings))
                pending.clear()

        for request in requests:
            context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
            settings = self._settings(dict(gen_kwargs))
            # One batch shares one set of decoding settings; answers keep the request order.
            if settings != pending_settings or len(pending) >= self.batch_size_per_gpu:
                flush()
                pending_settings = settings
            pending.append(self._request_inputs(context, doc_to_visual, doc_id, task, split))
        flush()
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        import torch

        from mobilevlm.processing import tokenizer_image_token

        results = []
        for request in requests:
            context, doc_to_target, doc_to_visual, doc_id, task, split = request.args
            target = doc_to_target if isinstance(doc_to_target, str) else doc_to_target(self.task_dict[task][split][doc_id])
            prompt, images = self._request_inputs(context, doc_to_visual, doc_id, task, split)
            prompt_ids = tokenizer_image_token(prompt, self.pipe.tokenizer)
            full_ids = tokenizer_image_token(prompt + " " + target, self.pipe.tokenizer)
            n_target = len(full_ids) - len(prompt_ids)
            if n_target <= 0:  # an empty continuation is certain and greedy
                results.append((0.0, True))
                continue
            ids = torch.tensor([full_ids], device=self.pipe.device)
            labels = ids.clone()
            labels[:, : len(prompt_ids)] = IGNORE_INDEX
            _, pixels, _ = self.pipe.encode(prompt, images, max_new_tokens=1)
            with torch.inference_mode():
                out = self.pipe.model(input_ids=ids, images=pixels, labels=labels)
            # The continuation sits at the end of the (image-expanded) sequence; logits at t predict t + 1.
            predicted = out.logits[0, -n_target - 1:-1].argmax(-1)
            results.append((-float(out.loss) * n_target, bool((predicted == ids[0, -n_target:]).all())))
        return results

    def generate_until_multi_round(self, requests) -> list[str]:
        raise NotImplementedError("mobilevlm: multi-round generation is not supported")
