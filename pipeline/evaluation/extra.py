"""Extra labelled folders scored beside the held-out split (``invsort evaluate ... --extra NAME=DIR``).

A held-out split of the training photos says how the model does on photos like those it was trained on; a folder
of real photos from elsewhere says how it does on the photos it will be sent. Each extra folder gets the held-out
split's metrics (:func:`pipeline.evaluation.metrics.compute_metrics`: top-1, per-class precision/recall/F1, the
confusion matrix) and the precision and coverage at the model's review threshold beside the precision the model
file promises (its ``target_precision``).

Folders whose name is not a class of the model (``not_footwear`` beside ``Boot``/``Sandal``/``Shoe``) are not an
error: every photo in them is wrong whatever the model says, so what matters is how many of them the model sorts
automatically into one of its categories (the open-set failure) rather than sending them to review. They are
reported per folder (how many, into which class) and counted as errors in the precision of everything sorted.
Rejecting them is not done here: this only measures.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import SourceError
from pipeline.evaluation.calibration import selective_scores
from pipeline.evaluation.metrics import compute_metrics
from pipeline.io.folders import load_images
from pipeline.io.storage import IMAGE_SUFFIXES


def parse_extra(specs: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["NAME=DIR", ...]`` as ``{NAME: DIR}``.

    Raises:
        ValueError: a spec without ``=``, with an empty name or folder, or a name given twice.
    """
    out: dict[str, str] = {}
    for spec in specs:
        name, sep, folder = spec.partition("=")
        name, folder = name.strip(), folder.strip()
        if not sep or not name or not folder:
            raise ValueError(f"expected NAME=DIR, got {spec!r}")
        if name in out:
            raise ValueError(f"extra folder name {name!r} given twice")
        out[name] = folder
    return out


def list_folder(root: str | Path) -> list[tuple[str, list[str]]]:
    """``(category, sorted image paths)`` for each non-hidden sub-folder of ``root`` with images (one is enough).

    Raises:
        SourceError: ``root`` missing or without a sub-folder of images.
    """
    root = Path(root)
    if not root.is_dir():
        raise SourceError(f"extra folder not found: {root}")
    out = []
    for d in sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")):
        paths = []
        for dirpath, dirnames, filenames in os.walk(d):
            dirnames[:] = sorted(x for x in dirnames if not x.startswith("."))
            paths += [os.path.join(dirpath, f) for f in sorted(filenames)
                      if not f.startswith(".") and Path(f).suffix.lower() in IMAGE_SUFFIXES]
        if paths:
            out.append((d.name, paths))
    if not out:
        raise SourceError(f"{root} has no sub-folder of images (expected e.g. {root}/Boot/*.jpg)")
    return out


def score_extra_folder(
    root: str | Path, *, class_names: list[str], size: tuple[int, int], in_chans: int,
    predict: Callable[[np.ndarray], np.ndarray], threshold: float, target_precision: float | None,
    progress: bool = False,
) -> dict[str, Any]:
    """Score one labelled folder whose sub-folders may include classes the model does not know.

    Returns:
        ``{"data_dir", "images_found", "images_failed", "failed_images", "target_precision", "known": {...}
        | None, "unknown": {...} | None, "all_sorted": {...}}``. ``known`` holds :func:`compute_metrics` over
        the photos of the model's classes plus ``at_threshold`` (:func:`selective_scores`); ``unknown`` holds per
        folder ``n``, ``sorted`` (auto-sorted into a category), ``sorted_share``, ``sorted_into`` (class ->
        count) and ``mean_confidence``, and their totals; ``all_sorted`` is the precision of everything the model
        sorts automatically when every photo of an unknown class counts as an error.
    """
    folders = list_folder(root)
    unknown_names = [name for name, _ in folders if name not in class_names]
    samples = [(p, class_names.index(name) if name in class_names else -1 - unknown_names.index(name))
               for name, paths in folders for p in paths]
    data = load_images(samples, size=size, in_chans=in_chans, progress=progress, desc="decode extra")
    probs = predict(data.images) if len(data.labels) else np.zeros((0, len(class_names)), np.float32)
    conf, pred = (probs.max(1), probs.argmax(1)) if len(probs) else (np.zeros(0), np.zeros(0, np.int64))
    known = data.labels >= 0
    report: dict[str, Any] = {
        "data_dir": str(root), "images_found": len(samples), "images_evaluated": int(len(data.labels)),
        "images_failed": len(data.failed), "failed_images": [{"path": p, "reason": r} for p, r in data.failed],
        "target_precision": target_precision, "threshold": float(threshold), "known": None, "unknown": None,
    }
    if known.any():
        report["known"] = {**compute_metrics(data.labels[known], pred[known], probs[known], class_names),
                           "at_threshold": selective_scores(probs[known], data.labels[known], threshold)}
    if unknown_names:
        per: dict[str, dict[str, Any]] = {}
        for j, name in enumerate(unknown_names):
            sel = data.labels == -1 - j
            taken = sel & (conf >= threshold)
            per[name] = {"n": int(sel.sum()), "sorted": int(taken.sum()),
                         "sorted_share": float(taken.sum() / max(1, sel.sum())),
                         "sorted_into": {c: int((pred[taken] == k).sum()) for k, c in enumerate(class_names)},
                         "mean_confidence": float(conf[sel].mean()) if sel.any() else float("nan")}
        n_unknown = sum(v["n"] for v in per.values())
        n_sorted = sum(v["sorted"] for v in per.values())
        report["unknown"] = {"folders": per, "n": n_unknown, "sorted": n_sorted,
                             "sorted_share": n_sorted / max(1, n_unknown)}
    taken = conf >= threshold
    right = taken & known & (pred == data.labels)
    report["all_sorted"] = {"n": int(len(conf)), "sorted": int(taken.sum()), "coverage": float(taken.mean())
                            if len(conf) else 0.0, "precision": float(right.sum() / taken.sum()) if taken.any()
                            else float("nan"), "errors_sorted": int(taken.sum() - right.sum())}
    return report


def _f(v: float | None, fmt: str = ".4f") -> str:
    return "n/a" if v is None or v != v else format(v, fmt)


def extra_markdown(name: str, r: dict[str, Any], class_names: list[str]) -> str:
    """The report.md section for one extra folder."""
    lines = ["", f"## Extra folder: {name}", "", f"- data: `{r['data_dir']}`",
             f"- images: {r['images_found']} found, {r['images_evaluated']} evaluated, {r['images_failed']} failed "
             "to decode"]
    k = r["known"]
    if k is not None:
        t = k["at_threshold"]
        lines += [
            f"- photos of the model's classes: {k['n']}; top-1 accuracy {k['accuracy']:.4f}; macro F1 "
            f"{k['macro_avg']['f1']:.4f}; ECE {k['ece']:.4f}",
            f"- at the review threshold {r['threshold']:.4f}: measured precision {_f(t['precision'])} "
            f"(promised {_f(r['target_precision'], '')}) on the {t['coverage']:.1%} it sorts "
            f"({t['sorted']} photos, {t['errors_sorted']} wrong); {t['needs_review']} go to review",
        ]
    u = r["unknown"]
    if u is not None:
        lines.append(f"- photos of classes the model does not know: {u['n']}; auto-sorted into a category "
                     f"(open-set failure): {u['sorted']} ({u['sorted_share']:.1%})")
    a = r["all_sorted"]
    lines.append(f"- everything sorted automatically, unknown-class photos counted wrong: {a['sorted']} of {a['n']} "
                 f"({a['coverage']:.1%}), precision {_f(a['precision'])}, {a['errors_sorted']} wrong")
    if k is not None:
        lines += ["", "| class | precision | recall | F1 | support |", "|---|---:|---:|---:|---:|"]
        lines += [f"| {c} | {m['precision']:.3f} | {m['recall']:.3f} | {m['f1']:.3f} | {m['support']} |"
                  for c, m in k["per_class"].items()]
        lines += ["", "Confusion matrix (rows: true class; columns: predicted class):", "",
                  "| true \\ predicted | " + " | ".join(class_names) + " |", "|---|" + "---:|" * len(class_names)]
        lines += [f"| {c} | " + " | ".join(str(v) for v in row) + " |"
                  for c, row in zip(class_names, k["confusion_matrix"], strict=True)]
    if u is not None:
        lines += ["", "Classes the model does not know (every automatic sort is an error):", "",
                  "| folder | photos | auto-sorted | share | sorted into | mean confidence |",
                  "|---|---:|---:|---:|---|---:|"]
        for folder, v in u["folders"].items():
            into = ", ".join(f"{c} {n}" for c, n in v["sorted_into"].items() if n) or "-"
            lines.append(f"| {folder} | {v['n']} | {v['sorted']} | {v['sorted_share']:.1%} | {into} | "
                         f"{_f(v['mean_confidence'], '.3f')} |")
    if r["failed_images"]:
        lines += ["", "Failed to decode:", ""] + [f"- `{b['path']}`: {b['reason']}" for b in r["failed_images"]]
    return "\n".join(lines) + "\n"
