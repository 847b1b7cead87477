"""Model merging for UniGuard: pure tensor methods behind a registry, applied over parameter subsets.

``registry`` names the methods (soup, ties, dare_linear, dare_ties, slerp), ``subsets``
selects tensors by name, ``state`` applies a method to whole state dicts, ``config``
validates recipes, ``checkpoints`` finds and loads the sources. Nothing here knows about
search: the search (``training.search``) proposes recipes and scores merged models.
"""

from training.merging.config import MergeParams, MergeRecipe
from training.merging.registry import MergeMethod, get_method, method_names
from training.merging.state import Merger, merge_state_dicts
from training.merging.subsets import BUILTIN_SUBSETS, ParameterSubset, load_subsets

__all__ = [
    "BUILTIN_SUBSETS", "MergeMethod", "MergeParams", "MergeRecipe", "Merger", "ParameterSubset",
    "get_method", "load_subsets", "merge_state_dicts", "method_names",
]
