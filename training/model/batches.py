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

from service.contract.policy import InputEncoder, Policy
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


SAFE_WINDOWS_PER_ROW = 3  # windows of one long benign text (a system prompt, an email) trained on


def _row_windows(encoder: InputEncoder, instruction: str, query: str, ex: Example, rng: random.Random) -> list[Encoded]:
    """The windows of one row that have a clear label (see ``encode_rows``)."""
    windows = encoder.encode_query_windows(instruction, query)
    if ex.label == 0:
        picked = [windows[0], *rng.sample(windows[1:], min(len(windows) - 1, SAFE_WINDOWS_PER_ROW - 1))]
        return [Encoded(ids, mask, types, 0) for ids, mask, types, _ in picked]
    if ex.span is None:  # unsafe, no span known: the start of an unsafe prompt is unsafe
        ids, mask, types, _ = windows[0]
        return [Encoded(ids, mask, types, 1)]
    shift = len(encoder.template.query.split("{prompt}")[0])
    a, b = ex.span[0] + shift, ex.span[1] + shift
    unsafe, clear = [], []
    for ids, mask, types, (start, end) in windows:
        overlap = max(0, min(end, b) - max(start, a))
        if (start <= a and end >= b) or overlap >= 0.8 * max(1, end - start):
            unsafe.append(Encoded(ids, mask, types, 1))
        elif overlap == 0:
            clear.append(Encoded(ids, mask, types, 0))
    return unsafe[:2] + rng.sample(clear, min(1, len(clear)))


def encode_rows(
    encoder: InputEncoder,
    policies: dict[str, Policy],
    rows: list[Example],
    with_rationale: bool = False,
    windows: bool = False,
    seed: int = 13,
) -> list[Encoded]:
    """Rows through the service's InputEncoder: the first window each, or with ``windows`` the
    windows whose label is clear, since the service judges every window of a prompt:

    - a safe row: its first window and up to two more (benign long text is benign throughout);
    - an unsafe row with a ``span`` (an injection inside an email, unsafe text inside chat):
      the windows holding the span are unsafe, one window clear of it is safe, windows that
      cut it are skipped;
    - an unsafe row without a span: its first window.

    With ``with_rationale`` a row's rationale follows its query after a [SEP]
    (``Query: <prompt> [SEP] <rationale>``); at inference the input ends after the query.
    """
    rng = random.Random(seed)
    out = []
    for ex in rows:
        instruction = encoder.template.instruction_text(policies[ex.policy_id])
        query = encoder.template.query_text(ex.text)
        if with_rationale and ex.rationale:
            query = f"{query} [SEP] {ex.rationale}"
        if windows and not with_rationale:
            out += _row_windows(encoder, instruction, query, ex, rng)
            continue
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
