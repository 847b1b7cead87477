"""Merge-recipe search: the space, the bandit, the out-of-source objective, the winner and its report."""
