"""Classification metrics: top-1 accuracy, per-class precision/recall/F1, the confusion matrix, and the expected
calibration error with its reliability-diagram bins.

Precision/recall/F1 and the confusion matrix come from scikit-learn; the expected calibration error follows Guo et
al. 2017, "On Calibration of Modern Neural Networks" (ICML), with 15 equal-width confidence bins.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

ECE_BINS = 15

def expected_calibration_error(
    confidences: np.ndarray, correct: np.ndarray, n_bins: int = ECE_BINS
) -> tuple[float, list[dict[str, float]]]:
    """Expected calibration error and the reliability-diagram bins.

    Source: Guo, Pleiss, Sun, Weinberger 2017, "On Calibration of Modern Neural Networks", eq. (3):
    ``ECE = sum_m |B_m| / n * |acc(B_m) - conf(B_m)|`` over ``n_bins`` equal-width bins of (0, 1],
    bin m holding the samples with confidence in ``((m-1)/M, m/M]``.

    Args:
        confidences: ``(N,)`` float, the top-1 probability of each sample, in 0..1.
        correct: ``(N,)`` bool, whether the top-1 prediction was right.
        n_bins: number of equal-width bins.

    Returns:
        ``(ece, bins)``: ece in 0..1 (0.0 for N = 0); bins is one dict per bin with ``lower``, ``upper``,
        ``count``, ``accuracy`` and ``confidence`` (the last two are NaN-free: 0.0 for an empty bin).
    """
    confidences = np.asarray(confidences, dtype=np.float64)
    correct = np.asarray(correct, dtype=bool)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    # right=True puts c in bin m when edges[m-1] < c <= edges[m]; confidence 0 goes to the first bin.
    idx = np.clip(np.digitize(confidences, edges[1:-1], right=True), 0, n_bins - 1)
    n = max(len(confidences), 1)
    ece, bins = 0.0, []
    for m in range(n_bins):
        sel = idx == m
        count = int(sel.sum())
        acc = float(correct[sel].mean()) if count else 0.0
        conf = float(confidences[sel].mean()) if count else 0.0
        ece += count / n * abs(acc - conf)
        bins.append({"lower": float(edges[m]), "upper": float(edges[m + 1]), "count": count,
                     "accuracy": acc, "confidence": conf})
    return float(ece), bins


def compute_metrics(
    y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray, class_names: Sequence[str]
) -> dict[str, Any]:
    """Classification metrics for predictions against labels.

    Args:
        y_true: ``(N,)`` int, true class indices into ``class_names``.
        y_pred: ``(N,)`` int, predicted class indices.
        probs: ``(N, K)`` float, class probabilities (rows sum to 1); the top-1 confidence for calibration is
            ``probs[i, y_pred[i]]``.
        class_names: the K class names, index order.

    Returns:
        A JSON-serialisable dict: ``accuracy`` (top-1, 0..1), ``n``, ``per_class`` (name → precision, recall,
        f1, support, accuracy; per-category accuracy is the recall), ``macro_avg`` and ``weighted_avg``
        (precision, recall, f1), ``confusion_matrix`` (K x K list of ints, rows = true, columns = predicted),
        ``ece`` (Guo et al. 2017, 15 bins) and ``reliability`` (the bins, see
        :func:`expected_calibration_error`). Classes without samples get 0.0 where a ratio is undefined.

    Raises:
        ValueError: shapes that do not fit together.
    """
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    y_true = np.asarray(y_true, dtype=np.int64)
    y_pred = np.asarray(y_pred, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    k = len(class_names)
    if y_true.shape != y_pred.shape or y_true.ndim != 1 or probs.shape != (len(y_true), k):
        raise ValueError(
            f"shapes do not fit: y_true {y_true.shape}, y_pred {y_pred.shape}, probs {probs.shape}, {k} classes"
        )
    labels = list(range(k))
    p, r, f, s = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    avgs = {}
    for avg in ("macro", "weighted"):
        ap, ar, af, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, average=avg,
                                                        zero_division=0)
        avgs[f"{avg}_avg"] = {"precision": float(ap), "recall": float(ar), "f1": float(af)}
    cm = confusion_matrix(y_true, y_pred, labels=labels) if len(y_true) else np.zeros((k, k), dtype=np.int64)
    conf = probs[np.arange(len(y_pred)), y_pred] if len(y_pred) else np.zeros(0)
    ece, bins = expected_calibration_error(conf, y_true == y_pred)
    return {
        "n": int(len(y_true)),
        "accuracy": float(accuracy_score(y_true, y_pred)) if len(y_true) else 0.0,
        "per_class": {
            name: {"precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i]),
                   "accuracy": float(r[i])}
            for i, name in enumerate(class_names)
        },
        **avgs,
        "confusion_matrix": cm.astype(int).tolist(),
        "ece": ece,
        "reliability": bins,
    }
