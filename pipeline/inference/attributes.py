"""One forward pass per model over one decoded batch: the category model and the models of other attributes
(:mod:`pipeline.attributes`) behind the interface of a single predictor, so that the streaming pipeline
(:func:`pipeline.inference.streaming.run_pipeline`), the stored batches and the re-sorts run a job of several models
unchanged: each photo is fetched and decoded once, at the category model's input size.

:meth:`WithAttributes.predict_scored` runs every model on the batch and puts their scored outputs side by side,
``(N, sum of output widths)``; :meth:`WithAttributes.results` splits them again and gives the category model's rows
with each attribute model's prediction in :attr:`pipeline.records.ItemResult.attributes`. An attribute model of
another input size gets the batch resized to its own (OpenCV's area interpolation on the CPU, bilinear on a GPU):
decoded once at the category model's size, resized a second time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from pipeline.records import AttributeResult, Item, ItemResult

if TYPE_CHECKING:
    from pipeline.inference.predictor import Predictor
    from pipeline.inference.streaming import AnyPredictor


def resized(batch: Any, size: tuple[int, int]) -> Any:
    """``batch`` (``(N, H, W, C)`` uint8, a numpy array or a torch tensor on any device) at ``size`` ``(H, W)``
    pixels, the same kind and dtype; ``batch`` itself when it has that size already."""
    h, w = size
    if tuple(batch.shape[1:3]) == (h, w):
        return batch
    if isinstance(batch, np.ndarray):
        import cv2

        out = np.empty((batch.shape[0], h, w, batch.shape[3]), dtype=np.uint8)
        for i, image in enumerate(batch):
            r = cv2.resize(image, (w, h), interpolation=cv2.INTER_AREA)
            out[i] = r.reshape(h, w, batch.shape[3])
        return out
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own name

    x = batch.permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(h, w), mode="bilinear", antialias=True, align_corners=False)
    return x.round_().clamp_(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()


class WithAttributes:
    """The category model ``primary`` with the models of other attributes ``others`` (``(attribute, predictor)``
    pairs), as one predictor. Every attribute of ``primary`` that this class does not define (``model_file``,
    ``input_size``, ``device``, ``is_cuda``, ``decode_backend``, ...) is ``primary``'s: failed rows, decoding and the
    job's model are the category model's.

    :meth:`close` closes nothing: the predictors are the process's cached ones (:func:`pipeline.sorting.get_predictor`).
    """

    def __init__(self, primary: AnyPredictor, others: Sequence[tuple[str, AnyPredictor]]):
        self.primary = primary
        self.others = list(others)
        widths = [primary.output_width, *(p.output_width for _, p in self.others)]
        self.output_width = sum(widths)
        self._edges = np.cumsum([0, *widths]).tolist()

    def __getattr__(self, name: str) -> Any:  # only for what this class does not define
        return getattr(self.primary, name)

    def close(self) -> None:
        pass

    def predict_scored(self, batch: Any) -> Any:
        """Every model's :meth:`predict_scored` on ``batch`` (``(N, H, W, C)`` uint8 at the category model's input
        size), side by side: ``(N, sum of output widths)`` float32, a CPU torch tensor when the category model
        runs on torch, else a numpy array."""
        parts = [self.primary.predict_scored(batch)]
        for _, p in self.others:
            parts.append(p.predict_scored(resized(batch, p.input_size)))
        return _concat(parts)

    def scored_on_device(self, batch: Any) -> Any:
        """:meth:`predict_scored` on the GPU (the torch runtime's CUDA path): a device tensor."""
        import torch

        torch_predictors = cast("list[Predictor]", [self.primary, *(p for _, p in self.others)])
        parts = [torch_predictors[0].scored_on_device(batch)]
        parts += [p.scored_on_device(resized(batch, p.input_size)) for p in torch_predictors[1:]]
        return torch.cat(parts, dim=1)

    def unknown(self, scored: Any) -> list[bool]:
        return self.primary.unknown(scored[:, : self._edges[1]])

    def results(self, items: list[Item], probs: Any, job_id: str | None) -> list[ItemResult]:
        """The category model's rows for ``items``, each with one :class:`AttributeResult` per other model (in the
        job's order); ``probs`` is :meth:`predict_scored`'s output, rows in ``items``' order."""
        e = self._edges
        rows = self.primary.results(items, probs[:, e[0]:e[1]], job_id)
        for k, (attribute, p) in enumerate(self.others, start=1):
            for row, found in zip(rows, p.results(items, probs[:, e[k]:e[k + 1]], job_id), strict=True):
                row.attributes.append(AttributeResult(
                    attribute=attribute, status=found.status, value=found.category, confidence=found.confidence,
                    topk=found.topk, error=found.error, model_name=found.model_name,
                    model_version=found.model_version))
        return rows


def _concat(parts: list[Any]) -> Any:
    """Side by side, as the first part's kind (numpy, or a CPU torch tensor)."""
    if isinstance(parts[0], np.ndarray):
        return np.concatenate([np.asarray(p, dtype=np.float32) for p in parts], axis=1)
    import torch

    return torch.cat([p if isinstance(p, torch.Tensor) else torch.from_numpy(np.asarray(p)) for p in parts], dim=1)
