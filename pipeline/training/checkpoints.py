"""Training checkpoints and the files a training run writes next to its model file.

For the model file ``<dir>/<stem>.pt``: ``<dir>/<stem>.pt.ckpt/last.pt`` (everything a resumed run needs: weights,
optimizer, scaler, torch's generator state, history, recipe, data summary) and ``best.pt`` (the best epoch's
weights), ``<dir>/<stem>.split.csv`` (the split manifest) and ``<dir>/<stem>.card.md`` (the model card).
Checkpoints are written atomically (:func:`pipeline.io.files.atomic_path`) and read with ``weights_only=True``.
"""

from __future__ import annotations

from pathlib import Path

import torch

from pipeline.errors import ModelFileError
from pipeline.io.files import atomic_path

CHECKPOINT_FORMAT = "invsort-checkpoint/1"


def checkpoint_dir(out: str | Path) -> Path:
    """Where training keeps ``last.pt`` and ``best.pt`` for the model file ``out``: ``<out>.ckpt/``."""
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


def split_manifest_path(out: str | Path) -> Path:
    """The split manifest of the model file ``out``: ``<stem>.split.csv`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".split.csv")


def model_card_path(out: str | Path) -> Path:
    """The model card of the model file ``out``: ``<stem>.card.md`` beside it."""
    out = Path(out)
    return out.with_name(out.stem + ".card.md")


def save_checkpoint(obj: dict, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (a reader never sees half a file). Raises ``OSError``."""
    with atomic_path(path) as tmp:
        torch.save(obj, tmp)


def load_checkpoint(path: str | Path) -> dict:
    """A training checkpoint, loaded onto the CPU with ``weights_only=True``.

    Raises:
        FileNotFoundError: no checkpoint there.
        ModelFileError: the file is not an invsort training checkpoint.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint to resume from: {path} (train once without --resume first)")
    try:
        ck = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ModelFileError(f"{path} is not a training checkpoint ({type(exc).__name__}: {exc})"[:400]) from None
    if not isinstance(ck, dict) or ck.get("format") != CHECKPOINT_FORMAT:
        raise ModelFileError(f"{path} is not an invsort training checkpoint")
    return ck
