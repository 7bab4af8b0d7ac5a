"""Model evaluation on a labelled folder-per-category tree: a JSON + Markdown report and plots.

Metrics are :mod:`pipeline.evaluation.metrics` (scikit-learn; the expected calibration error of Guo et al. 2017
with 15 bins) and :func:`pipeline.evaluation.calibration.selective_scores` at the model's review threshold.
Images are read with :func:`pipeline.io.folders.load_images`, the loader training uses. Plots use matplotlib's
Agg backend (no display needed).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import ConfigError, ModelFileError
from pipeline.evaluation.calibration import coverage_precision_curve, precision_interval, selective_scores
from pipeline.evaluation.extra import extra_markdown, score_extra_folder
from pipeline.evaluation.metrics import compute_metrics
from pipeline.evaluation.openset import markdown as openset_markdown
from pipeline.evaluation.openset import ood_section
from pipeline.evaluation.robustness import (
    DEFAULT_PER_CLASS,
    plot_examples,
    plot_robustness,
    robustness_markdown,
    robustness_report,
    shift_examples,
)
from pipeline.io.files import atomic_path, atomic_write_text
from pipeline.io.folders import Arrays, load_images, samples_for_classes
from pipeline.models.modelcard import write_model_card
from pipeline.models.modelfile import load_model_file, save_model_file
from pipeline.progress import progress as progress_display

log = logging.getLogger(__name__)

MAX_ERROR_IMAGES = 16


def load_labelled(
    data_dir: Path, model_classes: list[str], size: tuple[int, int], in_chans: int, *, progress: bool = False
) -> Arrays:
    """Every image of a folder-per-category tree decoded at ``size`` (``(H, W)`` px) with
    :func:`pipeline.io.folders.load_images`; labels are indices into ``model_classes``.

    Returns:
        :class:`pipeline.io.folders.Arrays`: images ``(N, H, W, in_chans)`` uint8, labels ``(N,)`` int64, paths,
        and ``failed`` ``(path, reason)`` for files that could not be read or decoded.

    Raises:
        ConfigError: a folder that is not one of ``model_classes`` (the message lists them).
        SourceError: ``data_dir`` missing or with fewer than two category folders.
    """
    return load_images(samples_for_classes(data_dir, model_classes), size=size, in_chans=in_chans,
                       progress=progress, desc="decode")


def evaluate(
    model_spec: str, data_dir: str | Path, out_dir: str | Path, *, batch_size: int = 128, device: str = "cpu",
    progress: bool = False, robustness: bool = False, robustness_per_class: int | None = DEFAULT_PER_CLASS,
    extra: Mapping[str, str | Path] | None = None, seed: int = 0, ood: str | Path | None = None,
) -> dict[str, Any]:
    """Evaluate a model on a labelled folder-per-category tree and write a report.

    Every image of ``data_dir/<Category>/...`` is decoded at the model's input size; images that cannot be
    decoded are counted and listed with their reason, not fatal. Folder names must be class names of the
    model (a subset is fine).

    Writes into ``out_dir`` (each file atomically): ``report.json`` (the metrics of
    :func:`pipeline.evaluation.metrics.compute_metrics` plus model name/version and counts), ``report.md``,
    ``confusion_matrix.png``, ``reliability.png``, ``coverage_precision.png``, ``most_confident_errors.png`` and
    ``training_curves.png`` (only when the model file has ``info["history"]``). With ``robustness`` also a
    ``robustness`` section (:func:`pipeline.evaluation.robustness.robustness_report`: the photos under the shifts
    real photos show), ``robustness.png`` and ``robustness_examples.png``; with ``extra`` an ``extra`` section per
    folder (:func:`pipeline.evaluation.extra.score_extra_folder`).

    Args:
        model_spec: model file path, ``s3://`` URI or ``bundled:NAME``.
        data_dir: the labelled folder tree.
        out_dir: report folder (created).
        batch_size: images per forward pass.
        device: ``auto``, ``cpu`` or ``cuda``.
        progress: show progress (:func:`pipeline.progress.progress`: a bar on a terminal, log lines elsewhere).
        robustness: score the shifts too (on at most ``robustness_per_class`` photos per class, seeded by
            ``seed``; 0 or None: all). Off here to keep library calls cheap; ``invsort evaluate`` turns it on.
        extra: ``{name: folder}`` of further labelled folders (real photos) scored beside ``data_dir``; their
            sub-folders may be classes the model does not know.
        ood: a folder of photos of none of the model's classes (any depth): an ``open_set`` section
            (:func:`pipeline.evaluation.openset.open_set_report`: AUROC, FPR at 95 % TPR, ``openset_hist.png``).

    Returns:
        The report dict written to ``report.json``.

    Raises:
        ConfigError: a folder is not a model class, no image could be decoded, or a bad device/batch size.
        SourceError: ``data_dir`` missing or with fewer than two category folders.
        FileNotFoundError, ModelFileError: from loading the model file.
    """
    from pipeline.inference.predictor import Predictor, PredictorOptions
    from pipeline.models.modelfile import load_model_file

    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    mf = load_model_file(model_spec)
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    data = load_labelled(data_dir, list(mf.class_names), mf.input_size, mf.in_chans, progress=progress)
    if not len(data.labels):
        raise ConfigError(f"no decodable image in {data_dir} ({len(data.failed)} failed)")
    with Predictor(mf, PredictorOptions(device=device)) as predictor:  # closes its forward threads
        probs = _predict_probs(predictor, data.images, batch_size, progress=progress)
        off = _off_distribution(mf, data, lambda x: _predict_probs(predictor, x, batch_size, progress=False),
                                robustness=robustness, per_class=robustness_per_class, extra=extra or {}, seed=seed,
                                progress=progress)
        open_set = ood_section(predictor, data.images, ood, out_dir, batch_size=batch_size) if ood else None
    y_true, y_pred = data.labels, probs.argmax(axis=1)
    metrics = compute_metrics(y_true, y_pred, probs, mf.class_names)
    metrics["at_threshold"] = selective_scores(probs, y_true, mf.review_threshold)

    out_dir.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "model": {"name": mf.name, "version": mf.version, "arch": mf.arch, "temperature": mf.temperature,
                  "review_threshold": mf.review_threshold},
        "data_dir": str(data_dir),
        "images_found": len(data.labels) + len(data.failed),
        "images_evaluated": len(data.labels),
        "images_failed": len(data.failed),
        "failed_images": [{"path": p, "reason": r} for p, r in data.failed],
        **metrics,
        "plots": _plot_all(data.images, y_true, probs, metrics, mf.class_names, mf.review_threshold,
                           mf.info.get("history") or [], out_dir),
    }
    off_md = _write_off_distribution(report, off, data, mf, out_dir)
    report["promise"] = promise_rows(report, mf.info.get("threshold") or {})
    off_md = promise_markdown(report["promise"]) + off_md
    if open_set is not None:  # --ood: AUROC, FPR at 95 % TPR and the score histogram (pipeline.evaluation.openset)
        report["open_set"] = open_set
        off_md += openset_markdown(open_set)
    atomic_write_text(out_dir / "report.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / "report.md", _markdown(report, mf.class_names) + off_md)
    return report


def _off_distribution(
    mf: Any, data: Arrays, predict: Any, *, robustness: bool, per_class: int | None, extra: Mapping[str, str | Path],
    seed: int, progress: bool,
) -> dict[str, Any]:
    """The robustness report (or None) and each extra folder's scores, with the model's ``predict``."""
    threshold, target = mf.review_threshold, (mf.info.get("threshold") or {}).get("target_precision")
    shifted = robustness_report(
        list(zip(data.paths, data.labels.tolist(), strict=True)), size=mf.input_size, in_chans=mf.in_chans,
        predict=predict, threshold=threshold, per_class=per_class, seed=seed, progress=progress,
    ) if robustness else None
    scored = {name: score_extra_folder(folder, class_names=list(mf.class_names), size=mf.input_size,
                                       in_chans=mf.in_chans, predict=predict, threshold=threshold,
                                       target_precision=target, progress=progress)
              for name, folder in extra.items()}
    return {"robustness": shifted, "extra": scored, "target_precision": target}


def promise_rows(report: dict[str, Any], chosen: dict[str, Any]) -> dict[str, Any]:
    """The precision the model file promises beside the precision measured at its threshold, in distribution (the
    evaluated folder) and off it (each robustness shift, the shifts pooled, each extra folder), with the two-sided
    95 % Clopper-Pearson interval of each measured precision.

    ``verdict`` per row: ``kept`` (measured >= promised), ``missed`` (the interval's upper end is below the promise:
    the shortfall is not noise), ``below, within noise``, or ``nothing sorted``.
    """
    target = chosen.get("target_precision")
    rows: list[dict[str, Any]] = []

    def add(name: str, where: str, n: int, k: int, wrong: int) -> None:
        lo, hi = precision_interval(k - wrong, k)
        prec = (k - wrong) / k if k else float("nan")
        verdict = ("nothing sorted" if not k else "no promise" if target is None else
                   "kept" if prec >= target else "missed" if hi < target else "below, within noise")
        rows.append({"rows": name, "distribution": where, "n": n, "sorted": k, "coverage": k / max(1, n),
                     "precision": prec, "ci95": [lo, hi], "errors_sorted": wrong, "verdict": verdict})

    t = report["at_threshold"]
    add(report["data_dir"], "in", report["images_evaluated"], t["sorted"], t["errors_sorted"])
    shifts = (report.get("robustness") or {}).get("shifts") or []
    for r in shifts:
        add(f"robustness: {r['name']}", "in" if r["name"] == "none" else "off", r["n"], r["sorted"],
            r["errors_sorted"])
    off = [r for r in shifts if r["name"] != "none"]
    if off:
        add("robustness: all shifts pooled", "off", sum(r["n"] for r in off), sum(r["sorted"] for r in off),
            sum(r["errors_sorted"] for r in off))
    for name, x in (report.get("extra") or {}).items():
        if x.get("known"):
            a = x["known"]["at_threshold"]
            add(f"{name}: the model's classes", "off", x["known"]["n"], a["sorted"], a["errors_sorted"])
        if x.get("unknown"):
            a = x["all_sorted"]
            add(f"{name}: all, unknown classes counted wrong", "off", a["n"], a["sorted"], a["errors_sorted"])
    return {"promised": target, "confidence_level": chosen.get("confidence_level"),
            "chosen_on": chosen.get("chosen_on", "validation"), "threshold": report["model"]["review_threshold"],
            "rows": rows}


def promise_markdown(p: dict[str, Any]) -> str:
    """The report.md section of :func:`promise_rows`."""
    def f(v: float) -> str:
        return "n/a" if v != v else f"{v:.4f}"

    chosen = {"validation": "the validation split",
              "validation+shifts": "the validation split and the same photos under the robustness shifts, pooled"}
    lines = ["", "## Promised and measured precision", "",
             f"The review threshold {p['threshold']:.4f} promises precision {p['promised']} on the rows it sorts "
             f"(Clopper-Pearson lower bound at {p['confidence_level']}, chosen on "
             f"{chosen.get(p['chosen_on'], p['chosen_on'])}). Measured at that threshold, with the 95 % "
             "Clopper-Pearson interval of each measured precision:", "",
             "| rows | distribution | n | sorted automatically | promised | measured precision | 95 % interval | "
             "errors sorted | verdict |", "|---|---|---:|---:|---:|---:|---|---:|---|"]
    for r in p["rows"]:
        lo, hi = r["ci95"]
        ci = "n/a" if lo != lo else f"{f(lo)}-{f(hi)}"
        lines.append(f"| {r['rows']} | {r['distribution']} | {r['n']} | {r['sorted']} ({r['coverage']:.1%}) | "
                     f"{p['promised']} | {f(r['precision'])} | {ci} | {r['errors_sorted']} | "
                     f"{r['verdict']} |")
    return "\n".join(lines) + "\n"


def _write_off_distribution(report: dict[str, Any], off: dict[str, Any], data: Arrays, mf: Any, out_dir: Path) -> str:
    """Put ``off`` into ``report``, draw the robustness plots; returns the Markdown sections."""
    report["robustness"], report["extra"] = off["robustness"], off["extra"]
    md = ""
    if off["robustness"] is not None:
        plot_robustness(off["robustness"], out_dir / "robustness.png", target_precision=off["target_precision"])
        examples = shift_examples(Path(data.paths[0]).read_bytes(), size=mf.input_size, in_chans=mf.in_chans)
        plot_examples(examples, out_dir / "robustness_examples.png")
        off["robustness"]["plots"] = ["robustness.png", "robustness_examples.png"]
        md += robustness_markdown(off["robustness"], target_precision=off["target_precision"])
    for name, scored in off["extra"].items():
        md += extra_markdown(name, scored, list(mf.class_names))
    return md


def _predict_probs(predictor: Any, images: np.ndarray, batch_size: int, *, progress: bool) -> np.ndarray:
    """``(N, K)`` float32 calibrated probabilities of ``(N, H, W, C)`` uint8 images, ``batch_size`` at a time."""
    import torch

    starts = range(0, len(images), batch_size)
    return np.concatenate([
        predictor.predict_probs(torch.from_numpy(images[i : i + batch_size])).numpy()
        for i in progress_display(starts, desc="evaluate", unit="batch", disable=not progress)
    ])


def _plot_all(
    images: np.ndarray, y_true: np.ndarray, probs: np.ndarray, metrics: dict[str, Any], class_names: list[str],
    threshold: float, history: list[dict], out_dir: Path,
) -> list[str]:
    """Write the report's plots into ``out_dir``; returns their file names."""
    y_pred = probs.argmax(axis=1)
    _plot_confusion(metrics, class_names, out_dir / "confusion_matrix.png")
    _plot_reliability(metrics, out_dir / "reliability.png")
    _plot_errors(images, y_true, y_pred, probs, class_names, out_dir / "most_confident_errors.png")
    _plot_coverage(probs.max(axis=1), y_pred == y_true, threshold, out_dir / "coverage_precision.png")
    plots = ["confusion_matrix.png", "reliability.png", "coverage_precision.png", "most_confident_errors.png"]
    if history:
        _plot_history(history, out_dir / "training_curves.png")
        plots.append("training_curves.png")
    return plots


def _save_figure(plt: Any, fig: Any, path: Path) -> None:
    """Write ``fig`` to ``path`` as a 100-dpi PNG atomically, then close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _pyplot() -> Any:
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
    _save_figure(plt, fig, path)


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
    _save_figure(plt, fig, path)


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
    _save_figure(plt, fig, path)


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
    _save_figure(plt, fig, path)


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
    _save_figure(plt, fig, path)


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


def evaluation_summary(report: dict[str, Any]) -> dict[str, Any]:
    """The figures of an :func:`evaluate` report that a model file keeps (``info["evaluations"]``) and its model
    card shows: top-1 and the promised beside the measured precision, the robustness table, each extra folder, the
    open-set AUROC and FPR at 95 % TPR."""
    t = report["at_threshold"]
    extra: dict[str, Any] = {}
    for name, x in (report.get("extra") or {}).items():
        known, unknown = x.get("known") or {}, x.get("unknown") or {}
        sel = known.get("at_threshold") or {}
        extra[name] = {"n": known.get("n", 0), "accuracy": known.get("accuracy"), "sorted": sel.get("sorted", 0),
                       "precision": sel.get("precision"), "unknown_n": unknown.get("n", 0),
                       "unknown_sorted": unknown.get("sorted", 0)}
    o = report.get("open_set")
    return {
        "data_dir": report["data_dir"], "evaluated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model_version": report["model"]["version"], "n": report["images_evaluated"],
        "accuracy": report["accuracy"], "promised": (report.get("promise") or {}).get("promised"),
        "sorted": t["sorted"], "precision": t["precision"],
        "robustness": [{k: r[k] for k in ("name", "n", "accuracy", "sorted", "precision")}
                       for r in (report.get("robustness") or {}).get("shifts") or []],
        "extra": extra,
        "open_set": None if o is None else {k: o[k] for k in ("method", "ood_dir", "auroc", "fpr_at_95_tpr", "n_ood",
                                                               "ood_auto_sorted")},
    }


def record_evaluation(model_path: str | Path, report: dict[str, Any], *, keep: int = 10) -> Path:
    """Store :func:`evaluation_summary` of ``report`` in the model file at ``model_path`` (``info["evaluations"]``,
    replacing an earlier one of the same folder; the ``keep`` latest are kept) and rewrite its model card
    (``<stem>.card.md`` beside it). The model's version does not change (``info`` is not part of it).

    Returns:
        The card's path.

    Raises:
        ModelFileError: ``model_path`` is not a writable local model file (a ``bundled:`` or ``s3://`` model), or
            the report is of another version of the model.
    """
    spec = str(model_path)
    if spec.startswith(("bundled:", "s3://")):
        raise ModelFileError(f"--record writes into the model file: {spec} is not a local file; copy it first")
    mf = load_model_file(spec)
    if mf.version != report["model"]["version"]:
        raise ModelFileError(f"the report is of version {report['model']['version']}, {spec} is {mf.version}")
    summary = evaluation_summary(report)
    kept = [e for e in mf.info.get("evaluations") or [] if e.get("data_dir") != summary["data_dir"]]
    mf.info["evaluations"] = [*kept, summary][-keep:]
    save_model_file(mf, spec)
    path = Path(spec)
    return write_model_card(mf, path.with_name(path.stem + ".card.md"))
