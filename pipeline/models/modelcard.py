"""The model card written next to every trained model (Mitchell et al. 2019, "Model Cards for Model Reporting").

Everything in it comes from the model file: its ``info`` (written by :func:`pipeline.training.recipe.train`) and its
fields. Sections: model details, intended use and limits, data (counts per class and split, what was excluded
and why, duplicates, the split manifest's SHA-256), recipe, training, metrics on the held-out test split,
calibration and the review threshold.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pipeline.models.meta import ModelMeta
    from pipeline.models.modelfile import ModelFile


def _f(x: Any, digits: int = 4) -> str:
    return f"{x:.{digits}f}" if isinstance(x, int | float) else "n/a"


def model_card(mf: ModelFile | ModelMeta) -> str:
    """The model card of ``mf`` as Markdown."""
    info = mf.info
    data = info.get("data", {})
    recipe = info.get("recipe", {})
    cal = info.get("calibration", {})
    thr = info.get("threshold", {})
    test = info.get("test")
    history = info.get("history", [])
    lines = [
        f"# Model card: {mf.arch} for {', '.join(mf.class_names)}",
        "",
        "## Model details",
        f"- Version: `{mf.version}` (SHA-256 of the weights and of every field that changes a prediction)",
        f"- Architecture: `{mf.arch}`, input {mf.input_size[0]}x{mf.input_size[1]} px, {mf.in_chans} channel(s), "
        f"mean {list(mf.mean)}, std {list(mf.std)}",
        f"- Classes ({mf.num_classes}): {', '.join(mf.class_names)}",
        f"- Predicts: `{mf.attribute}`" + (" (the item's category: `catalog_items`)" if mf.attribute == "category"
                                           else " (an attribute beside the category: `catalog_attributes`)"),
        f"- Starting weights: {recipe.get('weights') or 'none (trained from scratch)'}",
        f"- Created: {mf.created_at}",
        "",
        "## Intended use and limits",
        "- Sorting catalogue product photos into the classes above with invsort (`invsort sort`, the Celery "
        "worker). Rows whose calibrated top-1 probability is below the review threshold get "
        "`status = needs_review` with their top-5 instead of being sorted.",
        "- Only photos like the training data: same kind of product, framing and background. A photo of "
        "anything else is still given one of these classes; the threshold catches some of those, not all.",
        "- Figures below come from one held-out split of one data set; they are estimates for photos drawn the "
        "same way, not a guarantee for a different catalogue.",
        "",
        "## Data",
        f"- Source folder: `{data.get('root', 'n/a')}`",
        "- Good images per class: " + ", ".join(f"{k} {v}" for k, v in data.get("class_counts", {}).items()),
    ]
    if data.get("imbalance"):
        lines.append(f"- Imbalance (largest / smallest class): {data['imbalance']:.2f}x; handled by: "
                     f"{info.get('balance', 'n/a')}")
    split_counts = data.get("split_class_counts", {})
    if split_counts:
        lines += ["", "| split | " + " | ".join(mf.class_names) + " | total |",
                  "|---|" + "---:|" * (mf.num_classes + 1)]
        for s in ("train", "val", "test"):
            row = split_counts.get(s, {})
            lines.append(f"| {s} | " + " | ".join(str(row.get(c, 0)) for c in mf.class_names)
                         + f" | {sum(row.values())} |")
        lines.append("")
    lines += [
        f"- Split manifest: `{data.get('split_manifest', 'n/a')}`, SHA-256 `{data.get('split_sha256', 'n/a')}`; "
        "exact and near duplicates are kept inside one split",
        f"- Duplicate groups: {data.get('exact_duplicate_groups', 0)} exact, {data.get('near_duplicate_groups', 0)} "
        f"near; {data.get('conflict_groups', 0)} span more than one category",
        f"- Excluded files: {data.get('excluded_count', 0)}",
    ]
    for path, reason in data.get("excluded", [])[:20]:
        lines.append(f"  - `{path}`: {reason}")
    lines += ["", "## Recipe", "", "| setting | value |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in recipe.items()]
    lines += ["", "## Training", ""]
    if history:
        lines += ["| epoch | train loss | train acc | val loss | val acc | lr | images/s |",
                  "|---:|---:|---:|---:|---:|---:|---:|"]
        for h in history:
            lines.append(f"| {h['epoch']} | {_f(h.get('train_loss'))} | {_f(h.get('train_acc'))} | "
                         f"{_f(h.get('val_loss'))} | {_f(h.get('val_acc'))} | {h.get('lr', 0):.2e} | "
                         f"{h.get('images_per_s', 0):.0f} |")
    lines.append("")
    lines.append(f"Best epoch (highest validation accuracy): {info.get('best_epoch', 'n/a')}; "
                 f"early stop: {'yes' if info.get('stopped_early') else 'no'}; "
                 f"wall time {info.get('train_seconds', 0):.0f} s; training steps in "
                 f"{info.get('step_dtype', 'float32')}.")
    lines += [
        "",
        "## Calibration and review threshold (chosen on the validation split"
        + (" and the same photos under the robustness shifts, pooled)" if thr.get("chosen_on") == "validation+shifts"
           else ")"),
        f"- Temperature scaling (Guo et al. 2017): T = {_f(cal.get('temperature'), 3)}; validation ECE "
        f"{_f(cal.get('val_ece_before'))} before, {_f(cal.get('val_ece_after'))} after",
        f"- Review threshold: {_f(thr.get('threshold'))} for a target precision of "
        f"{thr.get('target_precision', 'n/a')}; on validation it sorts {_f(thr.get('coverage'), 3)} of rows with "
        f"precision {_f(thr.get('precision'))}"
        + (f" (Clopper-Pearson lower bound {_f(thr.get('precision_bound'))} at {thr['confidence_level']:g})"
           if thr.get("precision_bound") is not None else "")
        + ("" if thr.get("met") else " (target NOT reached)"),
    ]
    lines += ["", "## Open-set rejection (\"none of my categories\")", "", _open_set_line(mf)]
    lines += ["", "## Metrics on the held-out test split", ""]
    if test:
        sel = test.get("at_threshold", {})
        lines += [
            f"- Images: {test['n']}; top-1 accuracy {_f(test['accuracy'])}; macro F1 {_f(test['macro_avg']['f1'])}; "
            f"weighted F1 {_f(test['weighted_avg']['f1'])}; ECE {_f(test['ece'])}",
            f"- At the review threshold: precision {_f(sel.get('precision'))} on {_f(sel.get('coverage'), 3)} of "
            f"rows sorted; {sel.get('needs_review', 0)} to review; {sel.get('errors_sorted', 0)} wrong rows sorted",
            "",
            "| class | precision | recall | F1 | support |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, m in test["per_class"].items():
            lines.append(f"| {name} | {_f(m['precision'])} | {_f(m['recall'])} | {_f(m['f1'])} | {m['support']} |")
        lines += ["", "Confusion matrix (rows: true class, columns: predicted):", "",
                  "| true \\ predicted | " + " | ".join(mf.class_names) + " |",
                  "|---|" + "---:|" * mf.num_classes]
        for name, row in zip(mf.class_names, test["confusion_matrix"], strict=True):
            lines.append(f"| {name} | " + " | ".join(str(v) for v in row) + " |")
    else:
        lines.append("No test split (the data set was too small, or test_fraction was 0).")
    lines += evaluation_lines(info.get("evaluations") or [])
    return "\n".join(lines) + "\n"


def evaluation_lines(evaluations: list[dict[str, Any]]) -> list[str]:
    """The card's "Measured off the training distribution" section: each evaluation ``invsort evaluate --record``
    stored in the model file (the folder, top-1, the review threshold's promise beside the precision measured,
    the robustness table, extra real-photo folders, the open-set AUROC and FPR at 95 % TPR)."""
    if not evaluations:
        return ["", "## Measured off the training distribution", "",
                "Nothing recorded yet: `invsort evaluate MODEL DIR --out R --extra real=PHOTOS --ood OTHER --record` "
                "stores its figures here."]
    lines = ["", "## Measured off the training distribution",
             "", "Recorded by `invsort evaluate --record`; the promise is the precision the review threshold was "
             "chosen for, measured is the precision of the rows it let through."]
    for e in evaluations:
        lines += ["", f"### `{e['data_dir']}` ({e['evaluated_at']}, model version `{e['model_version']}`)", "",
                  f"- {e['n']} photos, top-1 accuracy {_f(e['accuracy'])}; promised precision "
                  f"{_f(e.get('promised'))}, measured {_f(e['precision'])} on {e['sorted']} rows sorted"]
        for name, x in (e.get("extra") or {}).items():
            line = f"- `{name}`: "
            if x.get("n"):
                line += (f"{x['n']} photos of the model's classes, top-1 {_f(x['accuracy'])}, {x['sorted']} sorted "
                         f"at precision {_f(x['precision'])}")
            if x.get("unknown_n"):
                line += f"; {x['unknown_sorted']} of {x['unknown_n']} photos of other things sorted"
            lines.append(line)
        if (o := e.get("open_set")) is not None:
            lines.append(f"- Open set ({o['method']}) on `{o['ood_dir']}`: AUROC {_f(o['auroc'])}, FPR at 95 % TPR "
                         f"{_f(o['fpr_at_95_tpr'])}, {o['ood_auto_sorted']} of {o['n_ood']} sorted")
        if e.get("robustness"):
            lines += ["", "| shift | photos | top-1 | sorted | precision of the sorted |", "|---|---:|---:|---:|---:|"]
            lines += [f"| {r['name']} | {r['n']} | {_f(r['accuracy'])} | {r['sorted']} | {_f(r['precision'])} |"
                      for r in e["robustness"]]
    return lines


def _open_set_line(mf: ModelFile | ModelMeta) -> str:
    o = mf.open_set
    if o is None:
        return ("Not fitted: every photo is given one of the classes above (fit one with `invsort calibrate-ood`).")
    return (f"{o.method} score on the penultimate features (Lee et al. 2018), fitted on {o.n_fit} training images; "
            f"threshold {o.threshold:.6g}, chosen to keep {o.tpr:.0%} of {o.n_val} validation images as known. Rows "
            "scoring below it get `needs_review` with the reason `unknown`, whatever their confidence. Measure it on "
            "photos of other things with `invsort evaluate MODEL DIR --ood OOD_DIR` (AUROC, FPR at 95 % TPR).")


def write_model_card(mf: ModelFile, path: str | Path) -> Path:
    """Write :func:`model_card` of ``mf`` to ``path`` (UTF-8) and return the path."""
    path = Path(path)
    path.write_text(model_card(mf), encoding="utf-8")
    return path
