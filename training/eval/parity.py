"""Does the served file answer like the checkpoint it came from, and alone like in a batch?

The release step runs this on the validation rows for every folder exported from a
checkpoint: the fp32 checkpoint (torch) is the reference, the served ``model.onnx`` (fused,
int8) is scored through the service's own loader. Verdicts are compared at the released
thresholds on calibrated scores, because a verdict is what a client sees; raw probability
differences are reported beside them. The served file is scored twice more: every window
alone, and in length-sorted batches of 64 (other rows as batch-mates, padding included):
the largest difference says whether a prompt's score depends on concurrent traffic.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass

import numpy as np

from service.contract.policy import Policy
from training.data.rows import Example
from training.eval.scoring import Scorer, score

# A served file whose verdicts differ from its checkpoint's on more rows than this fails release.
MIN_VERDICT_AGREEMENT = 0.995
BATCH = 64

Verdicts = Callable[[np.ndarray], np.ndarray]  # raw probabilities (row order) -> unsafe verdicts


@dataclass(frozen=True)
class Parity:
    rows: int
    verdict_agreement: float  # share of rows whose verdict matches the reference's
    max_abs_diff: float  # raw unsafe probability, served alone vs reference
    mean_abs_diff: float
    batch_invariance_max_diff: float  # served alone vs served in batches of BATCH
    reference: str
    served: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)

    def line(self) -> str:
        return (
            f"{self.served} vs {self.reference} on {self.rows} validation rows: verdicts agree on "
            f"{100 * self.verdict_agreement:.2f} %, |Δp| max {self.max_abs_diff:.4f} / mean {self.mean_abs_diff:.5f}; "
            f"alone vs in batches of {BATCH}: max |Δp| {self.batch_invariance_max_diff:.1e}"
        )


def sample_rows(rows: list[Example], limit: int, seed: int = 0) -> list[Example]:
    """At most ``limit`` rows, a fixed random sample (parity costs a torch pass over them)."""
    if limit <= 0 or len(rows) <= limit:
        return list(rows)
    idx = np.random.default_rng(seed).choice(len(rows), size=limit, replace=False)
    return [rows[i] for i in sorted(idx)]


def measure_parity(
    reference: Scorer, served: Scorer, rows: list[Example], policies: dict[str, Policy], verdicts: Verdicts
) -> Parity:
    ref, _ = score(reference, rows, policies)
    alone, _ = score(served, rows, policies, batch_size=1)
    batched, _ = score(served, rows, policies, batch_size=BATCH)
    diff = np.abs(alone - ref)
    return Parity(
        rows=len(rows),
        verdict_agreement=round(float(np.mean(verdicts(alone) == verdicts(ref))), 6),
        max_abs_diff=round(float(diff.max()), 6),
        mean_abs_diff=round(float(diff.mean()), 6),
        batch_invariance_max_diff=float(np.abs(alone - batched).max()),
        reference=reference.name,
        served=served.name,
    )
