"""Open-set rejection, measured and fitted onto existing model files.

:func:`open_set_report` is ``invsort evaluate MODEL DIR --ood OOD_DIR``: the model's open-set score
(:mod:`pipeline.models.openset`; the maximum softmax probability, Hendrycks & Gimpel 2017, for a model file without
one) on the labelled photos (in-distribution, positives) and on a folder of photos of other things
(out-of-distribution), with AUROC and the FPR at 95 % TPR (scikit-learn's ``roc_auc_score`` / ``roc_curve``), how
many out-of-distribution photos the worker would still sort automatically, and a histogram of the two score
distributions.

:func:`calibrate_ood` (``invsort calibrate-ood MODEL DIR``) fits the score onto a model file without retraining.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import ConfigError
from pipeline.io.files import atomic_path
from pipeline.io.folders import load_images, samples_for_classes
from pipeline.io.storage import IMAGE_SUFFIXES
from pipeline.models.openset import DEFAULT_TPR, fit_open_set

log = logging.getLogger(__name__)

HISTOGRAM = "openset_hist.png"
CALIBRATE_MAX_FIT = 4000


def auroc_fpr(id_scores: np.ndarray, ood_scores: np.ndarray, tpr: float = 0.95) -> tuple[float, float]:
    """``(AUROC, FPR at tpr TPR)`` of a score where higher means in-distribution (the positives): the area under
    the ROC curve, and the fraction of out-of-distribution rows above the lowest threshold that keeps ``tpr`` of
    the in-distribution ones.

    Raises:
        ValueError: either set empty.
    """
    from sklearn.metrics import roc_auc_score, roc_curve

    if not len(id_scores) or not len(ood_scores):
        raise ValueError("AUROC needs in- and out-of-distribution rows")
    y = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    s = np.nan_to_num(np.r_[id_scores, ood_scores].astype(np.float64), nan=-np.inf, neginf=-1e300, posinf=1e300)
    fpr, tprs, _ = roc_curve(y, s)
    return float(roc_auc_score(y, s)), float(fpr[np.searchsorted(tprs, tpr, side="left")])


def open_set_report(predictor: Any, id_images: np.ndarray, ood_images: np.ndarray, out_dir: Path, *,
                    batch_size: int = 128, ood_dir: str = "") -> dict[str, Any]:
    """Score ``id_images`` and ``ood_images`` (``(N, H, W, C)`` uint8) with ``predictor``'s open-set score and
    write :data:`HISTOGRAM` into ``out_dir``.

    Returns:
        ``{"method", "threshold", "tpr", "auroc", "fpr_at_95_tpr", "n_id", "n_ood", "id_known",
        "ood_unknown", "ood_auto_sorted", "ood_auto_sorted_fraction", "id_auto_sorted_fraction", "plot"}``:
        ``id_known``/``ood_unknown`` are fractions at the model's own threshold, ``*_auto_sorted*`` what the
        worker would mark ``sorted`` (confident enough and not unknown).
    """
    k = len(predictor.class_names)
    outs = []
    for images in (id_images, ood_images):
        parts = [predictor.predict_scored(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])))
                 for i in range(0, len(images), batch_size)]
        outs.append(torch.cat(parts) if parts else torch.zeros((0, predictor.output_width)))
    fitted = predictor.open_set
    method = fitted.method if fitted is not None else "max_softmax (no open-set score in the model file)"
    scores = [(o[:, k] if fitted is not None else o[:, :k].max(dim=1).values).numpy() for o in outs]
    auroc, fpr95 = auroc_fpr(scores[0], scores[1])
    sorted_ = [np.array([r.status == "sorted" for r in predictor.results(_items(len(o)), o, None)], dtype=bool)
               for o in outs]
    unknown = [np.array(predictor.unknown(o), dtype=bool) for o in outs]
    report = {
        "method": method, "threshold": None if fitted is None else fitted.threshold,
        "tpr": None if fitted is None else fitted.tpr, "ood_dir": ood_dir,
        "auroc": auroc, "fpr_at_95_tpr": fpr95, "n_id": len(scores[0]), "n_ood": len(scores[1]),
        "id_known": float(1 - unknown[0].mean()), "ood_unknown": float(unknown[1].mean()),
        "ood_auto_sorted": int(sorted_[1].sum()), "ood_auto_sorted_fraction": float(sorted_[1].mean()),
        "id_auto_sorted_fraction": float(sorted_[0].mean()),
    }
    report["plot"] = _plot_histogram(scores[0], scores[1], None if fitted is None else fitted.threshold, method,
                                     out_dir / HISTOGRAM)
    return report


def _items(n: int) -> list[Any]:
    from pipeline.records import Item

    return [Item(str(i), str(i)) for i in range(n)]


def _plot_histogram(id_scores: np.ndarray, ood_scores: np.ndarray, threshold: float | None, method: str,
                    path: Path) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    both = np.r_[id_scores, ood_scores]
    finite = both[np.isfinite(both)]
    lo, hi = (float(np.percentile(finite, 0.5)), float(finite.max())) if len(finite) else (0.0, 1.0)
    bins = np.linspace(lo, hi if hi > lo else lo + 1, 50).tolist()
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.hist(np.clip(id_scores, lo, hi), bins=bins, alpha=0.6, density=True, label=f"in-distribution ({len(id_scores)})")
    ax.hist(np.clip(ood_scores, lo, hi), bins=bins, alpha=0.6, density=True, label=f"OOD ({len(ood_scores)})")
    if threshold is not None:
        ax.axvline(threshold, color="k", linestyle="--", label="threshold")
    ax.set_xlabel(f"open-set score: {method.split(' ')[0]} (higher = known)")
    ax.set_ylabel("density")
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    plt.close(fig)
    return path.name


def markdown(r: dict[str, Any]) -> str:
    """The ``report.md`` section of :func:`open_set_report`'s dict."""
    thr = "none" if r["threshold"] is None else f"{r['threshold']:.4g} (chosen for TPR {r['tpr']:.0%} on validation)"
    return "\n".join([
        "## Open-set rejection", "",
        f"Score: {r['method']}; threshold {thr}. OOD photos: {r['n_ood']} from {r['ood_dir']}; in-distribution: "
        f"{r['n_id']}.", "",
        "| AUROC | FPR at 95 % TPR | in-distribution kept as known | OOD rejected as unknown | OOD auto-sorted |",
        "| --- | --- | --- | --- | --- |",
        f"| {r['auroc']:.4f} | {r['fpr_at_95_tpr']:.4f} | {r['id_known']:.1%} | {r['ood_unknown']:.1%} | "
        f"{r['ood_auto_sorted']} ({r['ood_auto_sorted_fraction']:.1%}) |", "",
        f"![open-set score histogram]({r['plot']})", "",
    ])


def calibrate_ood(model_spec: str, data_dir: str | Path, out: str | Path, *, tpr: float = DEFAULT_TPR,
                  seed: int = 0, max_fit: int = CALIBRATE_MAX_FIT) -> Any:
    """Fit the open-set score onto an existing model file, without retraining, and save it as ``out``.

    ``data_dir`` is a folder-per-category tree of the model's classes (its training photos, or photos like them):
    a seeded 70 % (at most ``max_fit`` images) fits the class means and covariance, the other 30 % chooses the
    threshold keeping ``tpr`` as known. Everything else in the file is kept; the version changes.

    Returns:
        The saved :class:`pipeline.models.modelfile.ModelFile`.

    Raises:
        ConfigError: a folder that is not a class of the model, a class without photos, or a bad ``tpr``.
        SourceError: ``data_dir`` missing or with fewer than two category folders.
    """
    from pipeline.models.modelfile import load_model_file, save_model_file

    mf = load_model_file(model_spec)
    labelled = samples_for_classes(data_dir, mf.class_names)
    order = np.random.default_rng(seed).permutation(len(labelled))
    cut = int(round(0.7 * len(order)))
    fit_idx, val_idx = sorted(order[:cut][:max_fit]), sorted(order[cut:])
    fit_set = load_images([labelled[i] for i in fit_idx], size=mf.input_size, in_chans=mf.in_chans)
    val_set = load_images([labelled[i] for i in val_idx], size=mf.input_size, in_chans=mf.in_chans)
    try:
        mf.open_set = fit_open_set(mf.build, mf.mean, mf.std, mf.num_classes, (fit_set.images, fit_set.labels),
                                   val_set.images, tpr=tpr)
    except ValueError as exc:
        raise ConfigError(f"cannot fit the open-set score on {data_dir}: {exc}") from None
    mf.info = {**mf.info, "open_set": {"method": mf.open_set.method, "threshold": mf.open_set.threshold,
                                       "tpr": tpr, "n_fit": mf.open_set.n_fit, "n_val": mf.open_set.n_val,
                                       "fitted_on": str(data_dir), "seed": seed}}
    save_model_file(mf, out)
    log.info("open-set score fitted onto %s: threshold %.4g for TPR %.2f", out, mf.open_set.threshold, tpr)
    return mf


def ood_section(predictor: Any, id_images: np.ndarray, ood_dir: str | Path, out_dir: Path, *,
                batch_size: int = 128) -> dict[str, Any]:
    """:func:`open_set_report` of every image under ``ood_dir`` (any depth; undecodable files are skipped and
    counted as ``ood_failed``) against ``id_images``.

    Raises:
        ConfigError: ``ood_dir`` is not a folder or holds no decodable image.
    """
    root = Path(ood_dir)
    if not root.is_dir():
        raise ConfigError(f"--ood {ood_dir}: not a folder")
    paths = sorted(str(p) for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    mf = predictor.model_file
    ood = load_images([(p, 0) for p in paths], size=mf.input_size, in_chans=mf.in_chans)
    if not len(ood.images):
        raise ConfigError(f"--ood {ood_dir}: no decodable image ({len(ood.failed)} failed)")
    report = open_set_report(predictor, id_images, ood.images, out_dir, batch_size=batch_size, ood_dir=str(ood_dir))
    report["ood_failed"] = len(ood.failed)
    return report
