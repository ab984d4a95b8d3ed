"""The multimodal causal LM: MobileLLaMA (HF LLaMA) + CLIP tower + projector, images spliced at `-200` ids.

`MobileLlamaForCausalLM(input_ids=..., images=...)` computes what the original computes: each `<image>`
placeholder id (-200) in `input_ids` is replaced by that image's projected features, labels there become
IGNORE_INDEX, and positions run 0..L-1 over the spliced sequence. Unlike the original (right padding only),
the splice also keeps left padding, which batched generation needs.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, LlamaModel, StoppingCriteria, StoppingCriteriaList
from transformers.models.llama.modeling_llama import LlamaForCausalLM, LlamaPreTrainedModel

from mobilevlm.config import MobileVLMConfig
from mobilevlm.constants import IGNORE_INDEX, IMAGE_TOKEN_INDEX
from mobilevlm.errors import PromptError
from mobilevlm.model.projector import build_vision_projector
from mobilevlm.model.vision import CLIPVisionTower

Images = torch.Tensor | Sequence[torch.Tensor] | None


class MobileLlamaModel(LlamaModel):
    config_class = MobileVLMConfig

    def __init__(self, config: MobileVLMConfig):
        super().__init__(config)
        if config.is_multimodal:
            self.vision_tower = CLIPVisionTower(config)
            self.mm_projector = build_vision_projector(config.mm_projector_type, config.mm_hidden_size, config.hidden_size)

    def get_vision_tower(self) -> CLIPVisionTower | None:
        return getattr(self, "vision_tower", None)


class MobileLlamaForCausalLM(LlamaForCausalLM):
    config_class = MobileVLMConfig
    _keys_to_ignore_on_load_unexpected = [r"rotary_emb\.inv_freq", r"position_ids"]

    def __init__(self, config: MobileVLMConfig):
        LlamaPreTrainedModel.__init__(self, config)
        self.model = MobileLlamaModel(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_model(self) -> MobileLlamaModel:
        return self.model

    def get_vision_tower(self) -> CLIPVisionTower | None:
        """The CLIP tower (None for a text-only MobileLLaMA), with the original's attributes (`image_processor`, ...)."""
        return self.model.get_vision_tower()

    @property
    def is_multimodal(self) -> bool:
        return hasattr(self.model, "vision_tower")

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """[n, 3, H, W] pixel values -> [n, image tokens, hidden] projected features."""
        if not self.is_multimodal:
            raise PromptError("this checkpoint is a text-only MobileLLaMA: it takes no images")
        features = self.model.vision_tower(images)
        projector_dtype = next(self.model.mm_projector.parameters()).dtype
        return self.model.mm_projector(features.to(projector_dtype))

    def _flat_images(self, images: Images) -> list[torch.Tensor]:
        if images is None:
            return []
        if isinstance(images, torch.Tensor):
            return list(images.reshape(-1, *images.shape[-3:]))
        flat: list[torch.Tensor] = []
        for item in images:
            flat.extend(item.reshape(-1, *item.shape[-3:]))
        return flat

    def prepare_inputs_labels_for_multimodal(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None,
        labels: torch.Tensor | None,
        images: Images,
        padding_side: str = "right",
    ):
        """Splice image features into the embedded sequence; returns (inputs_embeds, attention_mask, position_ids, labels).

        Images are matched to the `-200` ids in reading order over the batch. The original's training layout,
        one image slot per sample where text-only samples carry a dummy image, is recognised when the number
        of images equals the batch size and no sample has more than one placeholder.
        """
        batch = input_ids.shape[0]
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids, dtype=torch.bool)
        attention_mask = attention_mask.bool()
        placeholders = (input_ids == IMAGE_TOKEN_INDEX).sum(dim=1).tolist()
        flat = self._flat_images(images)
        one_slot_per_sample = len(flat) == batch and max(placeholders, default=0) <= 1 and sum(placeholders) != len(flat)
        if not one_slot_per_sample and sum(placeholders) != len(flat):
            raise PromptError(f"the prompt has {sum(placeholders)} <image> placeholder(s) but {len(flat)} image(s) were given")
        features = self.encode_images(torch.stack(flat)) if flat else None
        embed = self.get_input_embeddings()

        sequences, sequence_labels = [], []
        cursor = 0
        for b in range(batch):
            keep = attention_mask[b]
            ids = input_ids[b][keep]
            lab = labels[b][keep] if labels is not None else None
            slots = (ids == IMAGE_TOKEN_INDEX).nonzero().flatten().tolist()
            text_embeds = embed(ids.clamp(min=0))
            parts, part_labels, start = [], [], 0
            for pos in slots:
                parts.append(text_embeds[start:pos])
                parts.append(features[cursor])
                if lab is not None:
                    part_labels.append(lab[start:pos])
                    part_labels.append(lab.new_full((features.shape[1],), IGNORE_INDEX))
                cursor += 1
                start = pos + 1
            parts.append(text_embeds[start:])
            if lab is not None:
                part_labels.append(lab[start:])
            if one_slot_per_sample and not slots:
                # A text-only sample still consumes its (dummy) image slot; the empty slice keeps the projector
                # in the autograd graph so distributed training sees every parameter used (as the original).
                parts.append(features[cursor][:0])
                cursor += 1
            sequences.append(torch.cat(parts))
            if lab is not None:
                sequence_labels.append(torch.cat(part_labels))

        longest = max(len(s) for s in sequences)
        hidden = sequences[0].shape[-1]
        embeds = sequences[0].new_zeros(batch, longest, hidden)
        new_mask = torch.zeros(batch, longest, dtype=torch.bool, device=input_ids.device)
        new_labels = None if labels is None else labels.new_full((batch, longest), IGNORE_INDEX)
        for b, seq in enumerate(sequences):
            span = slice(longest - len(seq), longest) if padding_side == "left" else slice(0, len(seq))
            embeds[b, span] = seq
            new_mask[b, span] = True
            if new_labels is not None:
                new_labels[b, span] = sequence_labels[b]
        position_ids = (new_mask.long().cumsum(-1) - 1).clamp(min=0)
        return embeds, new_mask.long(), position_ids, new_labels

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache=None,
        inputs_embeds: torch.FloatTensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        images: Images = None,
        **kwargs,
    ):
        if inputs_embeds is None and input_ids is not None and (images is not None or (input_ids == IMAGE_TOKEN_INDEX).any()):
            if cache is not None and cache.get_seq_length() > 0:
                raise PromptError("images can only be given with the first (prefill) forward call")
            inputs_embeds, attention_mask, position_ids, labels = self.prepare_inputs_labels_for_multimodal(
                input_ids, attention_mask, labels, images
            )
            input_ids = None
        return super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            labels=labels,
            use_cache=use_cache,
            **kwargs,
        )

    @torch.no_grad()
    def generate(self, inputs: torch.Tensor | None = None, images: Images = None, attention_mask=None,
                 padding_side: str = "left", **kwargs):
        """`generate(input_ids, images=...)` as the original: returns the prompt ids (placeholders included)
        followed by the new ids, and stopping criteria are called with that same sequence.

        The images are spliced once and decoding runs from the embeddings, where transformers sees only the new
        ids; the prompt is put back in front of them for the criteria and the result.
        """
        if inputs is not None and "inputs_embeds" not in kwargs and (images is not None or (inputs == IMAGE_TOKEN_INDEX).any()):
            embeds, attention_mask, _, _ = self.prepare_inputs_labels_for_multimodal(
                inputs, attention_mask, None, images, padding_side=padding_side
            )
            if kwargs.get("stopping_criteria"):
                kwargs["stopping_criteria"] = StoppingCriteriaList(
                    _AfterPrompt(criterion, inputs) for criterion in kwargs["stopping_criteria"])
            new = super().generate(inputs_embeds=embeds, attention_mask=attention_mask, **kwargs)
            return torch.cat([_rows_for(inputs, new), new], dim=1)
        return super().generate(inputs, attention_mask=attention_mask, **kwargs)


def _rows_for(prompt: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The prompt rows matching `ids` rows (beams and multiple return sequences repeat each prompt)."""
    return prompt.to(ids.device).repeat_interleave(ids.shape[0] // prompt.shape[0], dim=0)


class _AfterPrompt(StoppingCriteria):
    """Calls a stopping criterion with the prompt ids in front of the generated ones, as the original's
    `KeywordsStoppingCriteria(keywords, tokenizer, input_ids)` expects (it counts from the prompt length)."""

    def __init__(self, criterion, prompt: torch.Tensor):
        self.criterion, self.prompt = criterion, prompt

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs):
        return self.criterion(torch.cat([_rows_for(self.prompt, input_ids), input_ids], dim=1), scores, **kwargs)


def load_pretrained_model(model_path, load_8bit: bool = False, load_4bit: bool = False, device_map="auto",
                          device: str | None = None, dtype=None):
    """The original's `mobilevlm.model.mobilevlm.load_pretrained_model`, same arguments, onto this package's loader.

    As in the original the model goes to CUDA (fp16) by default; where there is no GPU it stays on the CPU (fp32).
    `device_map="auto"` means the whole model on `device`; any other map is passed to transformers.
    """
    from mobilevlm.model.loading import load_pretrained_model as load

    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return load(model_path, load_8bit, load_4bit, device_map=None if device_map == "auto" else device_map,
                device=device, dtype=dtype)


def register_auto_classes() -> None:
    """Make `AutoConfig` / `AutoModelForCausalLM.from_pretrained(dir)` work for `model_type: mobilevlm`."""
    try:
        AutoConfig.register("mobilevlm", MobileVLMConfig)
    except ValueError:  # already registered
        pass
    try:
        AutoModelForCausalLM.register(MobileVLMConfig, MobileLlamaForCausalLM)
    except ValueError:
        pass
