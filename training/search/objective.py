"""The search objective: validation F1 of a merged model, computed in memory with torch.

Speed is the point: the validation rows are tokenised once per instruction template (every
window, as the service scores them), the sources' tensors live in memory, a trial loads the
merged state into one resident model and scores with ``torch.inference_mode``. Nothing
touches the disk between trials.

The reward is the mean over policies of the F1 each policy reaches at its own threshold
chosen as the service's export chooses it (best F1, sources weighted equally), because the
exported model is calibrated that way: a merge that only shifts scores is not penalised for
a threshold it will never be served with. F1 at 0.5 is recorded next to it.

``OutOfSourceSet`` swaps that reward for the one that decides what ships: the
out-of-source summary on the held-out *tune* half, at the release step's thresholds (best F1
under the FPR bound on every held-out benign source). The test half is never scored by the
search; it stays for the released figures and promotion. Either way the reward is stored in
``Scored.f1`` (the trial log's ``f1`` column), and the search log names which one it is.
"""

from __future__ import annotations

import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from service.contract.policy import InputEncoder, InputTemplate, Policy
from training.data.rows import Example
from training.eval.heldout import MAX_FPR, bounded_thresholds, heldout_result
from training.eval.metrics import f1_at, rows_by_policy, source_groups, source_weights
from training.eval.scoring import Window, encode_windows, model_scorer, score_windows
from training.eval.thresholds import ThresholdTarget, best_f1_threshold, choose_thresholds
from training.merging.params import MergeParams
from training.merging.state import Merger, StateDict
from training.merging.subsets import ParameterSubset
from training.search.space import Proposal


@dataclass
class Scored:
    """Validation result of one model: the reward and what it is made of."""

    f1: float
    f1_at_half: float
    per_policy: dict[str, dict[str, float]]
    seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "f1": round(self.f1, 6),
            "f1_at_0.5": round(self.f1_at_half, 6),
            "per_policy": self.per_policy,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class ValidationSet:
    """Labelled rows grouped by policy, tokenised lazily once per template."""

    examples: list[Example]
    policies: Mapping[str, Policy]
    tokenizer_json: Path
    max_length: int = 128
    stride: int = 32
    max_windows: int = 0  # per row, 0: all; the first windows of a long prompt (a CPU budget knob)
    _cache: dict[str, tuple[list[Window], np.ndarray]] = field(default_factory=dict, repr=False)
    _encoders: dict[str, InputEncoder] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        unknown = sorted({ex.policy_id for ex in self.examples} - set(self.policies))
        if unknown:
            raise ValueError(f"validation rows name policies with no policy file: {unknown}")
        if not self.examples:
            raise ValueError("no validation rows")
        self.labels = np.array([ex.label for ex in self.examples], dtype=int)
        self.by_policy = {pid: np.array(idx) for pid, idx in rows_by_policy(self.examples).items()}
        groups = source_groups(self.examples)  # lent rows pooled per kind, as the release step does
        self.weights = {pid: source_weights([groups[i] for i in idx]) for pid, idx in self.by_policy.items()}

    def windows(self, template: InputTemplate) -> tuple[list[Window], np.ndarray]:
        """Every window of every row (flattened, tokenised once per template) and the row each belongs to."""
        key = template.model_dump_json()
        if key not in self._cache:
            encoder = InputEncoder.from_file(self.tokenizer_json, template, self.max_length, self.stride)
            self._encoders[key] = encoder
            windows = encode_windows(encoder, self.examples, dict(self.policies), self.max_windows)
            self._cache[key] = (windows, np.asarray([w[0] for w in windows]))
        return self._cache[key]

    def score(self, model: Any, template: InputTemplate, batch_size: int = 64) -> np.ndarray:
        """Unsafe probability per row: the most unsafe window, as the service scores a prompt."""
        windows, _ = self.windows(template)
        run = model_scorer(model, self._encoders[template.model_dump_json()]).run
        scores, _ = score_windows(run, windows, len(self.examples), batch_size)
        return scores

    def evaluate(self, scores: np.ndarray) -> Scored:
        per: dict[str, dict[str, float]] = {}
        for pid, idx in self.by_policy.items():
            labels, s = self.labels[idx], scores[idx]
            t = best_f1_threshold(labels, s, self.weights[pid])
            per[pid] = {
                "f1": round(f1_at(labels, s, t), 6),
                "threshold": round(t, 6),
                "f1_at_0.5": round(f1_at(labels, s, 0.5), 6),
            }
        return Scored(
            f1=float(np.mean([p["f1"] for p in per.values()])),
            f1_at_half=float(np.mean([p["f1_at_0.5"] for p in per.values()])),
            per_policy=per,
        )


@dataclass
class OutOfSourceSet(ValidationSet):
    """``examples`` = validation rows, then held-out tune rows (``n_validation`` of the first kind).

    The reward is the out-of-source summary of the tune rows (mean over policy × source × class
    cells of recall or 1 − FPR) at thresholds chosen as the release step chooses them; the
    per-policy entries carry each policy's share of that summary and its threshold."""

    n_validation: int = 0
    max_fpr: float = MAX_FPR

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.n_validation < len(self.examples):
            raise ValueError("an out-of-source set needs validation rows and held-out tune rows")

    def thresholds(self, scores: np.ndarray) -> dict[str, float]:
        nv = self.n_validation
        val, tune = self.examples[:nv], self.examples[nv:]
        fallback = choose_thresholds(val, scores[:nv], ThresholdTarget("max_fpr", self.max_fpr))
        return bounded_thresholds(val, scores[:nv], tune, scores[nv:], fallback, self.max_fpr)

    def evaluate(self, scores: np.ndarray) -> Scored:
        tune, ts = self.examples[self.n_validation :], scores[self.n_validation :]
        chosen = self.thresholds(scores)
        result = heldout_result(tune, ts, chosen)
        at_half = heldout_result(tune, ts, dict.fromkeys(chosen, 0.5))
        per: dict[str, dict[str, float]] = {}
        for pid in sorted(chosen):
            accs = [c["recall"] if c["label"] else 1.0 - c["fpr"] for c in result.cells if c["policy"] == pid]
            if accs:
                per[pid] = {"summary": round(float(np.mean(accs)), 6), "threshold": round(chosen[pid], 6)}
        return Scored(f1=result.summary, f1_at_half=at_half.summary, per_policy=per)


class MergeObjective:
    """Scores proposals: merge the top-k sources in memory with the current method, evaluate.

    ``states[0]`` is the host (the top-1 source): its tensors fill whatever a subset leaves out.
    """

    def __init__(
        self,
        states: Sequence[StateDict],
        validation: ValidationSet,
        model: Any,
        subsets: Mapping[str, ParameterSubset],
        templates: Mapping[str, InputTemplate],
        base: StateDict | None = None,
        threads: int = 0,
        batch_size: int = 64,
    ) -> None:
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

    def merged_state(self, proposal: Proposal) -> dict[str, torch.Tensor]:
        if self.merger is None:
            raise RuntimeError("call use_method() first")
        return self.merger.merge(proposal.weights, self.subsets[proposal.choices.get("type", "all")])

    def evaluate(self, proposal: Proposal) -> Scored:
        started = time.perf_counter()
        self.load(self.merged_state(proposal))
        scored = self.validation.evaluate(
            self.validation.score(self.model, self.template_for(proposal), self.batch_size)
        )
        scored.seconds = time.perf_counter() - started
        return scored

    def load(self, state: Mapping[str, torch.Tensor]) -> None:
        load_into(self.model, state)


def load_into(model: Any, state: Mapping[str, torch.Tensor]) -> None:
    """Copy a state dict into a resident model (same architecture; every key must match)."""
    with torch.no_grad():
        model.load_state_dict(dict(state), strict=True)


def evaluate_state(
    model: Any,
    state: Mapping[str, torch.Tensor],
    validation: ValidationSet,
    template: InputTemplate,
    batch_size: int = 64,
) -> Scored:
    """Score one unmerged source (the baselines a merge must beat) with the resident model."""
    started = time.perf_counter()
    load_into(model, state)
    scored = validation.evaluate(validation.score(model, template, batch_size))
    scored.seconds = time.perf_counter() - started
    return scored
