"""Model evaluation on a labelled folder-per-category tree: metrics, a JSON + Markdown report and plots.

Metrics come from scikit-learn; the expected calibration error follows Guo et al. 2017, "On Calibration of
Modern Neural Networks" (ICML), with 15 equal-width confidence bins. Plots use matplotlib's Agg backend
(no display needed).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, ImageError
from pipeline.evaluation.calibration import coverage_precision_curve, selective_scores
from pipeline.io.images import decode_image

log = logging.getLogger(__name__)

ECE_BINS = 15
MAX_ERROR_IMAGES = 16


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


def _load_images(data_dir: Path, model_classes: list[str], size: tuple[int, int], in_chans: int):
    from pipeline.io.folders import scan_folder

    folders, samples = scan_folder(data_dir)
    unknown = [f for f in folders if f not in model_classes]
    if unknown:
        raise ConfigError(
            f"folder(s) {', '.join(repr(u) for u in unknown)} in {data_dir} are not classes of the model; "
            f"the model's classes: {', '.join(model_classes)}"
        )
    to_model = [model_classes.index(f) for f in folders]
    images, labels, paths, bad = [], [], [], []
    for path, label in samples:
        try:
            img = decode_image(Path(path).read_bytes(), size=size, in_chans=in_chans)
        except (ImageError, OSError) as exc:
            bad.append({"path": path, "reason": str(exc)})
            continue
        images.append(img)
        labels.append(to_model[label])
        paths.append(path)
    return images, np.asarray(labels, dtype=np.int64), paths, bad


def evaluate(
    model_spec: str, data_dir: str | Path, out_dir: str | Path, *, batch_size: int = 128, device: str = "cpu"
) -> dict[str, Any]:
    """Evaluate a model on a labelled folder-per-category tree and write a report.

    Every image of ``data_dir/<Category>/...`` is decoded at the model's input size; images that cannot be
    decoded are counted and listed with their reason, not fatal. Folder names must be class names of the
    model (a subset is fine).

    Writes into ``out_dir``: ``report.json`` (the metrics of :func:`compute_metrics` plus model name/version
    and counts), ``report.md``, ``confusion_matrix.png``, ``reliability.png``, ``most_confident_errors.png``
    and ``training_curves.png`` (only when the model file has ``info["history"]``).

    Args:
        model_spec: model file path, ``s3://`` URI or ``bundled:NAME``.
        data_dir: the labelled folder tree.
        out_dir: report folder (created).
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.

    Returns:
        The report dict written to ``report.json``.

    Raises:
        ConfigError: a folder is not a model class, no image could be decoded, or a bad device/batch size.
        SourceError: ``data_dir`` missing or with fewer than two category folders.
        FileNotFoundError, ModelFileError: from loading the model file.
    """
    import torch

    from pipeline.inference.predictor import Predictor
    from pipeline.models.modelfile import load_model_file

    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    mf = load_model_file(model_spec)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    images, y_true, paths, bad = _load_images(data_dir, list(mf.class_names), mf.input_size, mf.in_chans)
    if not images:
        raise ConfigError(f"no decodable image in {data_dir} ({len(bad)} failed)")
    predictor = Predictor(mf, device=device)
    stacked = np.stack(images)
    probs = np.concatenate([
        predictor.predict_probs(torch.from_numpy(stacked[i : i + batch_size])).numpy()
        for i in range(0, len(stacked), batch_size)
    ])
    y_pred = probs.argmax(axis=1)
    metrics = compute_metrics(y_true, y_pred, probs, mf.class_names)
    metrics["at_threshold"] = selective_scores(probs, y_true, mf.review_threshold)

    out_dir.mkdir(parents=True, exist_ok=True)
    history = mf.info.get("history") or []
    report: dict[str, Any] = {
        "model": {"name": mf.name, "version": mf.version, "arch": mf.arch, "temperature": mf.temperature,
                  "review_threshold": mf.review_threshold},
        "data_dir": str(data_dir),
        "images_found": len(images) + len(bad),
        "images_evaluated": len(images),
        "images_failed": len(bad),
        "failed_images": bad,
        **metrics,
        "plots": [],
    }
    _plot_confusion(metrics, mf.class_names, out_dir / "confusion_matrix.png")
    _plot_reliability(metrics, out_dir / "reliability.png")
    _plot_errors(stacked, y_true, y_pred, probs, mf.class_names, out_dir / "most_confident_errors.png")
    _plot_coverage(probs.max(axis=1), y_pred == y_true, mf.review_threshold, out_dir / "coverage_precision.png")
    report["plots"] = ["confusion_matrix.png", "reliability.png", "coverage_precision.png",
                       "most_confident_errors.png"]
    if history:
        _plot_history(history, out_dir / "training_curves.png")
        report["plots"].append("training_curves.png")
    (out_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (out_dir / "report.md").write_text(_markdown(report, mf.class_names))
    return report


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plot_confusion(metrics: dict, class_names: list[str], path: Path) -> None:
    from sklearn.metrics import ConfusionMatrixDisplay

    plt = _pyplot()
    k = len(class_names)
    fig, ax = plt.subplots(figsize=(max(6, 0.7 * k + 3), max(5, 0.7 * k + 2)))
    ConfusionMatrixDisplay(np.asarray(metrics["confusion_matrix"]), display_labels=class_names).plot(
        ax=ax, cmap="Blues", xticks_rotation=45, colorbar=False)
    ax.set_title(f"Confusion matrix (top-1 accuracy {metrics['accuracy']:.3f}, n={metrics['n']})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_reliability(metrics: dict, path: Path) -> None:
    plt = _pyplot()
    bins = metrics["reliability"]
    centers = [(b["lower"] + b["upper"]) / 2 for b in bins]
    width = bins[0]["upper"] - bins[0]["lower"]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.bar(centers, [b["accuracy"] for b in bins], width=width, edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set(xlim=(0, 1), ylim=(0, 1), xlabel="confidence (top-1 probability)", ylabel="accuracy",
           title=f"Reliability diagram (ECE {metrics['ece']:.4f}, {len(bins)} bins)")
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_coverage(confidence: np.ndarray, correct: np.ndarray, threshold: float, path: Path) -> None:
    plt = _pyplot()
    curve = coverage_precision_curve(confidence, correct)
    sel = confidence >= threshold
    cov = float(sel.mean()) if len(sel) else 0.0
    prec = float(correct[sel].mean()) if sel.any() else math.nan
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.plot(curve["coverage"], curve["precision"], label="sort rows with confidence >= t")
    ax.plot([cov], [prec], "o", color="red", label=f"review threshold {threshold:.3f}: coverage {cov:.3f}, "
            f"precision {prec:.4f}")
    lo = float(np.nanmin(curve["precision"])) if len(curve["precision"]) else 0.0
    ax.set(xlim=(0, 1.02), ylim=(max(0.0, min(lo, prec if prec == prec else 1.0) - 0.01), 1.002),
           xlabel="coverage (share of rows sorted automatically)", ylabel="precision of the sorted rows",
           title="Coverage / precision (rows below the threshold go to review)")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_history(history: list[dict], path: Path) -> None:
    plt = _pyplot()
    epochs = [h.get("epoch", i + 1) for i, h in enumerate(history)]
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for key in ("train_loss", "val_loss"):
        if any(key in h for h in history):
            ax1.plot(epochs, [h.get(key, math.nan) for h in history], marker="o", label=key)
    for key in ("train_acc", "val_acc"):
        if any(key in h for h in history):
            ax2.plot(epochs, [h.get(key, math.nan) for h in history], marker="o", label=key)
    ax1.set(xlabel="epoch", ylabel="loss", title="Loss per epoch")
    ax2.set(xlabel="epoch", ylabel="accuracy", title="Accuracy per epoch")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _plot_errors(images: np.ndarray, y_true: np.ndarray, y_pred: np.ndarray, probs: np.ndarray,
                 class_names: list[str], path: Path) -> None:
    plt = _pyplot()
    wrong = np.flatnonzero(y_true != y_pred)
    conf = probs[np.arange(len(y_pred)), y_pred]
    worst = wrong[np.argsort(-conf[wrong], kind="stable")][:MAX_ERROR_IMAGES]
    cols = 4
    rows = max(1, math.ceil(len(worst) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.5 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, i in zip(axes.flat, worst, strict=False):
        img = images[i]
        ax.imshow(img[:, :, 0] if img.shape[2] == 1 else img, cmap="gray" if img.shape[2] == 1 else None,
                  vmin=0, vmax=255)
        ax.set_title(f"{class_names[y_true[i]]} → {class_names[y_pred[i]]} ({conf[i]:.2f})", fontsize=9)
    if len(worst) == 0:
        axes.flat[0].text(0.5, 0.5, "no errors", ha="center", va="center")
    fig.suptitle(f"Most confident errors ({len(worst)} of {len(wrong)})")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _markdown(report: dict, class_names: list[str]) -> str:
    m = report["model"]
    lines = [
        f"# Evaluation of {m['name']} (version {m['version']})",
        "",
        "## Summary",
        "",
        f"- data: `{report['data_dir']}`",
        f"- images: {report['images_found']} found, {report['images_evaluated']} evaluated, "
        f"{report['images_failed']} failed to decode",
        f"- top-1 accuracy: {report['accuracy']:.4f}",
        f"- macro F1: {report['macro_avg']['f1']:.4f}; weighted F1: {report['weighted_avg']['f1']:.4f}",
        f"- expected calibration error (15 bins, Guo et al. 2017): {report['ece']:.4f} "
        f"(temperature {m['temperature']:.3f})",
        f"- at the model's review threshold {m['review_threshold']:.4f}: precision "
        f"{report['at_threshold']['precision']:.4f} on the {report['at_threshold']['coverage']:.1%} of images it "
        f"sorts; {report['at_threshold']['needs_review']} go to review",
        "",
        "## Per class",
        "",
        "| class | precision | recall (= accuracy) | F1 | support |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, c in report["per_class"].items():
        lines.append(f"| {name} | {c['precision']:.3f} | {c['recall']:.3f} | {c['f1']:.3f} | {c['support']} |")
    for key in ("macro_avg", "weighted_avg"):
        a = report[key]
        lines.append(f"| *{key.replace('_', ' ')}* | {a['precision']:.3f} | {a['recall']:.3f} | {a['f1']:.3f} | |")
    lines += ["", "## Confusion matrix", "", "Rows: true class; columns: predicted class.", "",
              "| true \\ predicted | " + " | ".join(class_names) + " |",
              "|---|" + "---:|" * len(class_names)]
    for name, row in zip(class_names, report["confusion_matrix"], strict=True):
        lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    if report["failed_images"]:
        lines += ["", "## Images that failed to decode", ""]
        lines += [f"- `{b['path']}`: {b['reason']}" for b in report["failed_images"]]
    lines += ["", "## Plots", ""]
    lines += [f"![{p.removesuffix('.png')}]({p})" for p in report["plots"]]
    return "\n".join(lines) + "\n"
