"""Batching: the original's right-padding collator and its `group_by_modality_length` sampler."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import pad_sequence
from torch.utils.data import Sampler

from mobilevlm.constants import IGNORE_INDEX


@dataclass
class SupervisedCollator:
    """Pads ids with the pad id and labels with IGNORE_INDEX, truncates both to `model_max_length` (before the
    image splice, as the original), attention mask = ids != pad. Images are stacked when all have one shape.

    `sample_ids` / `mismatches` travel with the batch so the trainer can count mismatched samples even when the
    data is loaded in worker processes; the trainer removes them before the forward pass.
    """

    pad_token_id: int
    model_max_length: int

    def __call__(self, instances: list[dict]) -> dict:
        ids = pad_sequence([x["input_ids"] for x in instances], batch_first=True, padding_value=self.pad_token_id)
        labels = pad_sequence([x["labels"] for x in instances], batch_first=True, padding_value=IGNORE_INDEX)
        ids, labels = ids[:, : self.model_max_length], labels[:, : self.model_max_length]
        batch = {"input_ids": ids, "labels": labels, "attention_mask": ids.ne(self.pad_token_id),
                 "sample_ids": [x["sample_id"] for x in instances],
                 "mismatches": [x["mismatch"] for x in instances]}
        images = [x["image"] for x in instances if x.get("image") is not None]
        if images:
            same_shape = all(image.shape == images[0].shape for image in images)
            batch["images"] = torch.stack(images) if same_shape else images
        return batch


def _even_chunks(indices: list[int], lengths: list[int], num_chunks: int) -> list[list[int]]:
    """Split a length-sorted mega-batch into per-process chunks of equal count and similar total length."""
    if len(indices) % num_chunks:
        return [indices[i::num_chunks] for i in range(num_chunks)]
    per_chunk = len(indices) // num_chunks
    chunks: list[list[int]] = [[] for _ in range(num_chunks)]
    totals = [0.0] * num_chunks
    for index in indices:
        shortest = totals.index(min(totals))
        chunks[shortest].append(index)
        totals[shortest] += lengths[index]
        if len(chunks[shortest]) == per_chunk:
            totals[shortest] = float("inf")
    return chunks


def length_grouped_indices(lengths: list[int], batch_size: int, world_size: int, generator) -> list[int]:
    megabatch = world_size * batch_size
    order = torch.randperm(len(lengths), generator=generator).tolist()
    groups = [sorted(order[i: i + megabatch], key=lambda j: lengths[j], reverse=True)
              for i in range(0, len(order), megabatch)]
    return [i for group in groups for chunk in _even_chunks(group, lengths, world_size) for i in chunk]


def modality_length_grouped_indices(lengths: list[int], batch_size: int, world_size: int, generator) -> list[int]:
    """Image and text-only samples (positive / negative lengths) never share a mega-batch; mega-batches are
    shuffled and the two leftover partial ones are merged at the end, as in the original."""
    if all(n > 0 for n in lengths) or all(n < 0 for n in lengths):
        return length_grouped_indices([abs(n) for n in lengths], batch_size, world_size, generator)
    image_idx = [i for i, n in enumerate(lengths) if n > 0]
    text_idx = [i for i, n in enumerate(lengths) if n < 0]
    megabatch = world_size * batch_size
    groups = []
    leftovers: list[int] = []
    for subset in (image_idx, text_idx):
        sub_lengths = [abs(lengths[i]) for i in subset]
        ordered = [subset[i] for i in length_grouped_indices(sub_lengths, batch_size, world_size, generator)]
        chunks = [ordered[i: i + megabatch] for i in range(0, len(ordered), megabatch)]
        groups.extend(chunks[:-1])
        leftovers.extend(chunks[-1])
    groups = [groups[i] for i in torch.randperm(len(groups), generator=generator).tolist()]
    if leftovers:
        groups.append(sorted(leftovers))
    return [i for group in groups for i in group]


class ModalityLengthGroupedSampler(Sampler):
    """Seeded with `seed + epoch`, so every process draws the same order and a resumed run the same one."""

    def __init__(self, lengths: list[int], batch_size: int, world_size: int, seed: int):
        if any(n == 0 for n in lengths):
            raise ValueError("a sample has no words: cannot group by length")
        self.lengths, self.batch_size, self.world_size, self.seed = lengths, batch_size, world_size, seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(modality_length_grouped_indices(self.lengths, self.batch_size, self.world_size, generator))
