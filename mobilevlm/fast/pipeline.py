"""`FastPipeline`: the `Pipeline` API (generate / stream / generate_batch / chat) on the lean decoder.

Single-sequence greedy and sampled decoding run on `LeanDecoder`; beam search and batches fall back to
the transformers path of `Pipeline` (same model, same quantized weights).
"""
from __future__ import annotations

import threading

import torch

from mobilevlm.fast.decoder import LeanDecoder
from mobilevlm.fast.memory import limit_heap_retention
from mobilevlm.generation import GenerationSettings, Pipeline


def sample_next(logits: torch.Tensor, settings: GenerationSettings) -> int:
    """Greedy at temperature 0, else temperature + nucleus (top-p) sampling with torch's global generator."""
    if settings.temperature <= 0:
        return int(logits.argmax())
    probs = torch.softmax(logits / settings.temperature, dim=-1)
    if settings.top_p is not None and settings.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        drop = sorted_probs.cumsum(-1) - sorted_probs > settings.top_p
        sorted_probs[drop] = 0
        return int(order[torch.multinomial(sorted_probs, 1)])
    return int(torch.multinomial(probs, 1))


class FastPipeline(Pipeline):
    def __init__(self, tokenizer, model, image_processor, context_len: int, conv_mode: str = "v1"):
        super().__init__(tokenizer, model, image_processor, context_len, conv_mode)
        if model.is_multimodal:
            model.get_model().vision_tower.drop_unused_layers()
        self.decoder = LeanDecoder(model, context_len)

    @classmethod
    def from_pretrained(cls, model_path, device: str = "cpu", dtype="bfloat16", quantize: str | None = None,
                        group_size: int | None = None, conv_mode: str = "v1") -> "FastPipeline":
        """A checkpoint directory (full precision, or written by `mobilevlm quantize`).

        `quantize` ("int8" / "int4") quantizes a full-precision checkpoint while loading; `dtype` is the
        compute dtype of everything else (bf16 by default: much faster than fp32 on CPUs with AVX512-BF16).
        The int8 / int4 kernels are CPU kernels; on a GPU the lean decoder runs in full precision.
        """
        from mobilevlm.errors import MobileVLMError
        from mobilevlm.fast.checkpoint import is_quantized_checkpoint, load_quantized
        from mobilevlm.fast.quantize import DEFAULT_GROUP_SIZE, quantize_model
        from mobilevlm.model.loading import load_pretrained_model, resolve_model_dir

        model_dir = resolve_model_dir(model_path)
        quantized = is_quantized_checkpoint(model_dir)
        if str(device) == "cpu":
            limit_heap_retention()
        if str(device) != "cpu" and (quantize or quantized):
            raise MobileVLMError(f"int8 / int4 weights run on the CPU only; load {model_dir} with device='cpu', "
                                 f"or a full-precision checkpoint on {device}")
        if quantized:
            tokenizer, model, processor, context_len = load_quantized(model_dir)
            stored = model.config.quantization["mode"]
            if quantize and quantize != stored:
                raise MobileVLMError(f"{model_dir} is already quantized to {stored}; it cannot be loaded as {quantize}")
        else:
            tokenizer, model, processor, context_len = load_pretrained_model(
                model_dir, device=device, dtype=torch.bfloat16 if quantize else dtype)
            if quantize:
                quantize_model(model, quantize, group_size or DEFAULT_GROUP_SIZE)
        return cls(tokenizer, model, processor, context_len, conv_mode)

    def _generate_ids(self, ids_batch, pixels, settings: GenerationSettings, budget: int, streamer=None,
                      cancel: threading.Event | None = None) -> torch.Tensor:
        if len(ids_batch) != 1 or settings.num_beams != 1:
            return super()._generate_ids(ids_batch, pixels, settings, budget, streamer, cancel)
        stops = [s for s in settings.stop if s]
        eos = self.tokenizer.eos_token_id
        tokens: list[int] = []
        with self.lock:
            if streamer is not None:
                streamer.put(torch.empty(0, dtype=torch.long))  # the (empty) prompt, as transformers does
            try:
                logits = self.decoder.prefill(self.decoder.embed_prompt(ids_batch[0], pixels))
                while len(tokens) < budget:
                    token = sample_next(logits, settings)
                    tokens.append(token)
                    if streamer is not None:
                        streamer.put(torch.tensor([token]))
                    if token == eos or (cancel is not None and cancel.is_set()):
                        break
                    if stops and any(s in self.tokenizer.decode(tokens[-32:]) for s in stops):
                        break
                    if len(tokens) < budget:
                        logits = self.decoder.step(token)
            finally:
                if streamer is not None:
                    streamer.end()
        return torch.tensor([tokens], dtype=torch.long)
