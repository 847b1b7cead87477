"""The search objective: validation F1 of a merged model, computed in memory with torch.

Speed is the point: the validation rows are tokenised once per instruction template (every
window, as the service scores them), the sources' tensors live in memory, a trial loads the
merged state into one resident model and scores with ``torch.inference_mode``. Nothing
touches the disk between trials.

The reward is the mean over policies of the F1 each policy reaches at its own threshold
chosen as the service's export chooses it (best F1, sources weighted equally), because the
exported model is calibrated that way: a merge that only shifts scores is not penalised for
a threshold it will never be served with. F1 at 0.5 is recorded next to it.
"""

from __future__ import annotations

import os
import time
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from service.policy import InputEncoder, InputTemplate, Policy
from training.data import Example
from training.merging.config import MergeParams
from training.merging.state import Merger, StateDict
from training.merging.subsets import ParameterSubset
from training.metrics import best_f1_threshold, source_weights
from training.search.space import Proposal
from training.trainer import Encoded, predict_proba


def f1_at(labels: np.ndarray, scores: np.ndarray, threshold: float) -> float:
    pred = scores >= threshold
    tp = float((pred & (labels == 1)).sum())
    fp = float((pred & (labels == 0)).sum())
    fn = float((~pred & (labels == 1)).sum())
    return 0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn)


@dataclass
class Scored:
    """Validation result of one model: the reward and what it is made of."""

    f1: float
    f1_at_half: float
    per_policy: dict[str, dict[str, float]]
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"f1": round(self.f1, 6), "f1_at_0.5": round(self.f1_at_half, 6), "per_policy": self.per_policy,
                "seconds": round(self.seconds, 3)}


@dataclass
class ValidationSet:
    """Labelled rows grouped by policy, tokenised lazily once per template."""

    examples: list[Example]
    policies: Mapping[str, Policy]
    tokenizer_json: Path
    max_length: int = 128
    stride: int = 32
    max_windows: int = 0  # per row, 0: all; the first windows of a long prompt (a CPU budget knob)
    _cache: dict[str, tuple[list[Encoded], np.ndarray]] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted({ex.policy_id for ex in self.examples} - set(self.policies))
        if unknown:
            raise ValueError(f"validation rows name policies with no policy file: {unknown}")
        if not self.examples:
            raise ValueError("no validation rows")
        self.labels = np.array([ex.label for ex in self.examples], dtype=int)
        groups: dict[str, list[int]] = defaultdict(list)
        for i, ex in enumerate(self.examples):
            groups[ex.policy_id].append(i)
        self.by_policy = {pid: np.array(idx) for pid, idx in sorted(groups.items())}
        # Lent rows (benign:*, cross:*) pooled per kind, as training.evaluate.choose_thresholds does.
        self.weights = {pid: source_weights([self.examples[i].source.split(":")[0] for i in idx])
                        for pid, idx in self.by_policy.items()}

    def windows(self, template: InputTemplate) -> tuple[list[Encoded], np.ndarray]:
        """Every window of every row (flattened) and the row each window belongs to."""
        key = template.model_dump_json()
        if key not in self._cache:
            encoder = InputEncoder.from_file(self.tokenizer_json, template, self.max_length, self.stride)
            rows: list[Encoded] = []
            owner: list[int] = []
            for i, ex in enumerate(self.examples):
                enc = encoder.encode(self.policies[ex.policy_id], ex.text)
                keep = enc.count if not self.max_windows else min(enc.count, self.max_windows)
                for ids, mask, types in list(zip(enc.input_ids, enc.attention_mask, enc.token_type_ids))[:keep]:
                    rows.append(Encoded(ids.tolist(), mask.tolist(), types.tolist(), ex.label))
                    owner.append(i)
            self._cache[key] = (rows, np.asarray(owner))
        return self._cache[key]

    def score(self, model, template: InputTemplate, batch_size: int = 64) -> np.ndarray:
        """Unsafe probability per row: the most unsafe window, as the service scores a prompt."""
        rows, owner = self.windows(template)
        probs = predict_proba(model, rows, batch_size=batch_size)
        out = np.zeros(len(self.examples), dtype=np.float64)
        np.maximum.at(out, owner, probs.astype(np.float64))
        return out

    def evaluate(self, scores: np.ndarray) -> Scored:
        per: dict[str, dict[str, float]] = {}
        for pid, idx in self.by_policy.items():
            labels, s = self.labels[idx], scores[idx]
            t = best_f1_threshold(labels, s, self.weights[pid])
            per[pid] = {"f1": round(f1_at(labels, s, t), 6), "threshold": round(t, 6), "f1_at_0.5": round(f1_at(labels, s, 0.5), 6)}
        return Scored(f1=float(np.mean([p["f1"] for p in per.values()])),
                      f1_at_half=float(np.mean([p["f1_at_0.5"] for p in per.values()])), per_policy=per)


class MergeObjective:
    """Scores proposals: merge the top-k sources in memory with the current method, evaluate.

    ``states[0]`` is the host (the top-1 source): its tensors fill whatever a subset leaves out.
    """

    def __init__(self, states: Sequence[StateDict], validation: ValidationSet, model, subsets: Mapping[str, ParameterSubset],
                 templates: Mapping[str, InputTemplate], base: StateDict | None = None, threads: int = 0, batch_size: int = 64) -> None:
        import torch

        torch.set_num_threads(threads or os.cpu_count() or 1)
        self.states = list(states)
        self.validation = validation
        self.model = model.eval()
        self.subsets = dict(subsets)
        self.templates = dict(templates)
        self.base = base
        self.batch_size = batch_size
        self.merger: Merger | None = None

    def use_method(self, method: str, params: MergeParams) -> None:
        """Switch method; the previous method's cached task vectors are released first."""
        if self.merger is not None:
            self.merger.clear_cache()
        self.merger = None
        self.merger = Merger(self.states, method, params, base=self.base, host=0, cache=True)

    def template_for(self, proposal: Proposal) -> InputTemplate:
        key = proposal.choices.get("instruction")
        if key is None:
            return next(iter(self.templates.values()))
        return self.templates[key]

    def merged_state(self, proposal: Proposal) -> dict:
        if self.merger is None:
            raise RuntimeError("call use_method() first")
        return self.merger.merge(proposal.weights, self.subsets[proposal.choices.get("type", "all")])

    def evaluate(self, proposal: Proposal) -> Scored:
        started = time.perf_counter()
        self.load(self.merged_state(proposal))
        scored = self.validation.evaluate(self.validation.score(self.model, self.template_for(proposal), self.batch_size))
        scored.seconds = time.perf_counter() - started
        return scored

    def load(self, state: Mapping) -> None:
        load_into(self.model, state)


def load_into(model, state: Mapping) -> None:
    """Copy a state dict into a resident model (same architecture; every key must match)."""
    import torch

    with torch.no_grad():
        model.load_state_dict(dict(state), strict=True)


def evaluate_state(model, state: Mapping, validation: ValidationSet, template: InputTemplate, batch_size: int = 64) -> Scored:
    """Score one unmerged source (the baselines a merge must beat) with the resident model."""
    started = time.perf_counter()
    load_into(model, state)
    scored = validation.evaluate(validation.score(model, template, batch_size))
    scored.seconds = time.perf_counter() - started
    return scored
