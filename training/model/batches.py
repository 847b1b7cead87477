"""Encoded rows and length-grouped batches: what every loop and every torch scorer feeds a model.

Batches are grouped by length (sorted inside shuffled chunks) because most prompts are
short and padding to the longest of a random batch would double the work on 2 cores.
Rows are built by the service's ``InputEncoder``, so training sees what serving builds.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from service.policy import InputEncoder, Policy
from training.data.rows import Example


@dataclass
class Encoded:
    input_ids: list[int]
    attention_mask: list[int]
    token_type_ids: list[int]
    label: int


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def encode_rows(
    encoder: InputEncoder, policies: dict[str, Policy], rows: list[Example], with_rationale: bool = False
) -> list[Encoded]:
    """First window of every row through the service's InputEncoder.

    With ``with_rationale`` a row's rationale follows its query after a [SEP]
    (``Query: <prompt> [SEP] <rationale>``); at inference the input ends after the query.
    """
    out = []
    for ex in rows:
        instruction = encoder.template.instruction_text(policies[ex.policy_id])
        query = encoder.template.query_text(ex.text)
        if with_rationale and ex.rationale:
            query = f"{query} [SEP] {ex.rationale}"
        ids, mask, types = encoder.encode_first_window(instruction, query)
        out.append(Encoded(ids, mask, types, ex.label))
    return out


def length_grouped_batches(lengths: list[int], batch_size: int, rng: random.Random, chunk: int = 64) -> list[list[int]]:
    """Indices in batches of similar length, chunk order and batch order shuffled."""
    idx = list(range(len(lengths)))
    rng.shuffle(idx)
    batches: list[list[int]] = []
    span = batch_size * chunk
    for start in range(0, len(idx), span):
        block = sorted(idx[start : start + span], key=lambda i: lengths[i])
        batches.extend(block[i : i + batch_size] for i in range(0, len(block), batch_size))
    rng.shuffle(batches)
    return batches


def collate(rows: list[Encoded], pad_id: int = 0) -> dict[str, torch.Tensor]:
    longest = max(len(r.input_ids) for r in rows)

    def pad(seqs: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([s + [value] * (longest - len(s)) for s in seqs], dtype=torch.long)

    return {
        "input_ids": pad([r.input_ids for r in rows], pad_id),
        "attention_mask": pad([r.attention_mask for r in rows], 0),
        "token_type_ids": pad([r.token_type_ids for r in rows], 0),
        "labels": torch.tensor([r.label for r in rows], dtype=torch.long),
    }


def to_device(rows: list[Encoded], device: str) -> dict[str, torch.Tensor]:
    return {k: v.to(device) for k, v in collate(rows).items()}
