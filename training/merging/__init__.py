"""Model merging for UniGuard: pure tensor methods behind a static registry, applied over parameter subsets.

``methods`` holds the tensor functions (generalised task arithmetic, SLERP), ``registry``
names them (soup, ties, dare_linear, dare_ties, slerp), ``subsets`` selects tensors by
name, ``state`` applies a method to whole state dicts, ``params`` and ``recipe`` validate
settings, ``checkpoints`` finds and loads the sources. Nothing here knows about search:
the search (``training.search``) proposes recipes and scores merged models.
"""

from training.merging.params import MergeParams
from training.merging.recipe import MergeRecipe
from training.merging.registry import METHODS, MergeMethod, get_method, method_names
from training.merging.state import Merger, merge_state_dicts
from training.merging.subsets import BUILTIN_SUBSETS, ParameterSubset, load_subsets

__all__ = [
    "BUILTIN_SUBSETS",
    "METHODS",
    "MergeMethod",
    "MergeParams",
    "MergeRecipe",
    "Merger",
    "ParameterSubset",
    "get_method",
    "load_subsets",
    "merge_state_dicts",
    "method_names",
]
