"""Quality of a quantized (or bf16) model against full precision, measured rather than assumed.

`logit_report`: teacher-forced logits of both models on the same input (images spliced): max / mean absolute
difference, the difference relative to the reference logits' spread, and top-1 agreement per position.
`greedy_agreement`: each model decodes greedily on its own; how many leading tokens agree.
"""
from __future__ import annotations

import torch


@torch.inference_mode()
def _logits(model, input_ids: list[int], pixels: torch.Tensor | None) -> torch.Tensor:
    ids = torch.tensor([input_ids])
    images = None if pixels is None else pixels.to(model.dtype)
    return model(input_ids=ids, images=images).logits[0].float()


def logit_report(reference, candidate, input_ids: list[int], pixels: torch.Tensor | None = None) -> dict:
    ref, cand = _logits(reference, input_ids, pixels), _logits(candidate, input_ids, pixels)
    diff = (ref - cand).abs()
    return {
        "max_abs_diff": diff.max().item(),
        "mean_abs_diff": diff.mean().item(),
        "ref_logit_std": ref.std().item(),
        "rel_max_diff": (diff.max() / ref.std()).item(),
        "top1_agreement": (ref.argmax(-1) == cand.argmax(-1)).float().mean().item(),
    }


def greedy_agreement(reference_pipe, candidate_pipe, prompt: str, images=None, max_new_tokens: int = 32) -> dict:
    """Greedy continuations of both pipelines (token ids, EOS not forced): agreeing prefix length and ratio."""
    from mobilevlm.generation import GenerationSettings

    settings = GenerationSettings(max_new_tokens=max_new_tokens)
    outputs = []
    for pipe in (reference_pipe, candidate_pipe):
        ids, pixels, budget = pipe.encode(prompt, images, max_new_tokens)
        outputs.append(pipe._generate_ids([ids], pixels, settings, budget)[0].tolist())
    ref, cand = outputs
    prefix = next((i for i, (a, b) in enumerate(zip(ref, cand)) if a != b), min(len(ref), len(cand)))
    return {"tokens": len(ref), "agreeing_prefix": prefix, "prefix_ratio": prefix / max(len(ref), 1),
            "reference_ids": ref, "candidate_ids": cand}
