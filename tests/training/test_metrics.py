"""Threshold choice and metrics: known answers on small arrays."""

from __future__ import annotations

import numpy as np

from training.eval.metrics import binary_scores, source_weights
from training.eval.thresholds import best_f1_threshold


def test_binary_scores_known_answer() -> None:
    labels = np.array([1, 1, 0, 0])
    scores = np.array([0.9, 0.4, 0.6, 0.1])
    s = binary_scores(labels, scores, 0.5)
    assert (s["precision"], s["recall"], s["f1"], s["fpr"], s["accuracy"]) == (0.5, 0.5, 0.5, 0.5, 0.5)
    assert s["roc_auc"] == 0.75


def test_single_class_sources_report_what_is_defined() -> None:
    s = binary_scores(np.zeros(3, dtype=int), np.array([0.1, 0.7, 0.2]), 0.5)
    assert s["f1"] is None and s["recall"] is None and abs(s["fpr"] - 1 / 3) < 1e-3


def test_best_threshold_separates_separable_scores() -> None:
    labels = np.array([0, 0, 0, 1, 1])
    scores = np.array([0.1, 0.2, 0.3, 0.8, 0.9])
    t = best_f1_threshold(labels, scores)
    assert 0.3 < t <= 0.8
    assert binary_scores(labels, scores, t)["f1"] == 1.0


def test_source_weights_balance_sources() -> None:
    w = source_weights(["a"] * 9 + ["b"])
    assert abs(w[:9].sum() - w[9:].sum()) < 1e-9


def test_weights_move_the_threshold_toward_the_small_source() -> None:
    # A large source of easy safe rows and a small source of hard safe rows at 0.6.
    labels = np.array([0] * 50 + [0] * 5 + [1] * 5)
    scores = np.array([0.05] * 50 + [0.6] * 5 + [0.7] * 5)
    sources = ["big"] * 50 + ["hard"] * 5 + ["pos"] * 5
    t = best_f1_threshold(labels, scores, source_weights(sources))
    assert 0.6 < t <= 0.7
