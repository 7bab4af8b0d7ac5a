"""Open-set rejection: a score for "none of my categories", stored in the model file and computed by the network.

The score is the Mahalanobis score on the penultimate features (Lee et al., "A Simple Unified Framework for
Detecting Out-of-Distribution Samples and Adversarial Attacks", NeurIPS 2018): class means and one shared
covariance fitted on the training split's features, score = minus the smallest squared Mahalanobis distance to a
class mean (higher = more like the training photos). Its threshold is chosen on the validation split so that a
stated fraction of in-distribution rows (the true-positive rate, default 95 %) scores at or above it; a row below
it is ``unknown``.

Why Mahalanobis and not a logit score: measured on the footwear dev model (mobilenet_v2, 3 classes), with the
catalogue holdout as in-distribution and 79 real photos of other things as out-of-distribution, maximum softmax
probability (Hendrycks & Gimpel, ICLR 2017) gave AUROC 0.88 / FPR at 95 % TPR 0.53, maximum logit (Hendrycks et
al., ICML 2022) 0.87 / 0.60, energy (Liu et al., NeurIPS 2020) 0.87 / 0.62, k-NN on normalised features (Sun et
al., ICML 2022, k=1) 0.98 / 0.09, Mahalanobis 0.998 / 0.00 (README, "Open-set rejection"). A logit score is also
nearly redundant with the review threshold, which already sends low-confidence rows to review.

The score runs inside the network: :class:`OpenSetNet` wraps the classifier so that one forward pass returns
``(N, num_classes + 1)``, the logits followed by the score. The ONNX Runtime and OpenVINO exports
(:mod:`pipeline.models.runtimes`) export that wrapper, so every runtime computes the same score.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

import numpy as np
import torch
from torch import nn

from pipeline.io.images import to_model_input
from pipeline.models.meta import UNKNOWN as UNKNOWN  # the reason of a needs_review row the score calls unknown

METHODS = ("mahalanobis",)
DEFAULT_TPR = 0.95


@dataclass
class OpenSet:
    """A fitted open-set score: ``method``, ``threshold`` (a row scoring below it is unknown), the ``tpr`` it was
    chosen for on ``n_val`` validation rows, and the method's tensors: ``whiten`` ``(D, D)`` (``W`` with
    ``W Wᵀ`` = the inverse shared covariance) and ``centers`` ``(C, D)`` (the class means times ``W``)."""

    method: str
    threshold: float
    tpr: float
    whiten: torch.Tensor
    centers: torch.Tensor
    n_fit: int = 0
    n_val: int = 0

    def to_dict(self) -> dict[str, Any]:
        """The model file's ``open_set`` entry (tensors and plain values only)."""
        return {"method": self.method, "threshold": float(self.threshold), "tpr": float(self.tpr),
                "whiten": self.whiten.detach().float().cpu().contiguous(),
                "centers": self.centers.detach().float().cpu().contiguous(), "n_fit": int(self.n_fit),
                "n_val": int(self.n_val)}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> OpenSet:
        """Raises: KeyError, TypeError, ValueError on a damaged entry."""
        method = str(d["method"])
        if method not in METHODS:
            raise ValueError(f"unknown open-set method {method!r}")
        return cls(method=method, threshold=float(d["threshold"]), tpr=float(d["tpr"]),
                   whiten=torch.as_tensor(d["whiten"]).float(), centers=torch.as_tensor(d["centers"]).float(),
                   n_fit=int(d.get("n_fit", 0)), n_val=int(d.get("n_val", 0)))

    def hash_parts(self) -> list[bytes]:
        """What :func:`pipeline.models.modelfile.model_version` hashes: method, threshold, TPR, then the tensors'
        bytes."""
        meta = repr([self.method, float(self.threshold), float(self.tpr)]).encode()
        return [meta, *(t.float().contiguous().numpy().tobytes() for t in (self.whiten, self.centers))]


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Linear]:
    """``(body, head)``: ``model`` with its last ``nn.Linear`` replaced by ``nn.Identity`` (so it returns the
    penultimate features) and that linear layer. Every registry architecture ends in one. Modifies ``model``."""
    last = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            last = (name, module)
    if last is None:
        raise ValueError(f"{type(model).__name__} has no linear classifier layer")
    name, head = last
    parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
    setattr(parent, name.rpartition(".")[2], nn.Identity())
    return model, head


class OpenSetNet(nn.Module):
    """A classifier that also scores: ``(N, C, H, W)`` → ``(N, num_classes + 1)``, the logits then the open-set
    score (:func:`mahalanobis_score`). Built by :meth:`pipeline.models.modelfile.ModelFile.build_scoring`."""

    def __init__(self, model: nn.Module, open_set: OpenSet):
        super().__init__()
        self.body, self.head = split_head(model)
        self.register_buffer("whiten", open_set.whiten.clone())
        self.register_buffer("centers", open_set.centers.clone())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        features = self.body(x)
        logits = self.head(features)
        whiten, centers = cast(torch.Tensor, self.whiten), cast(torch.Tensor, self.centers)
        score = mahalanobis_score(features.float(), whiten, centers)
        return torch.cat([logits, score.to(logits.dtype).unsqueeze(1)], dim=1)


def mahalanobis_score(features: torch.Tensor, whiten: torch.Tensor, centers: torch.Tensor) -> torch.Tensor:
    """``(N, D)`` features → ``(N,)`` minus the smallest squared Mahalanobis distance to a class mean (Lee et al.
    2018), computed as ``‖f W - μ_c W‖²`` with ``W Wᵀ = Σ⁻¹``."""
    z = features @ whiten
    d2 = ((z.unsqueeze(1) - centers.unsqueeze(0)) ** 2).sum(dim=2)
    return -d2.min(dim=1).values


def fit_mahalanobis(features: np.ndarray, labels: np.ndarray, num_classes: int,
                    shrinkage: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """``(whiten, centers)`` from training features ``(N, D)`` and labels: class means and the shared (tied)
    covariance, shrunk towards its mean variance by ``shrinkage`` so that it inverts, in float64.

    Raises:
        ValueError: a class without features.
    """
    f = features.astype(np.float64)
    means = []
    for c in range(num_classes):
        fc = f[labels == c]
        if not len(fc):
            raise ValueError(f"class {c} has no training rows to fit the open-set score on")
        means.append(fc.mean(axis=0))
    mu = np.stack(means)
    centred = f - mu[labels]
    cov = centred.T @ centred / max(1, len(f) - num_classes)
    d = cov.shape[0]
    cov = (1 - shrinkage) * cov + shrinkage * (np.trace(cov) / d) * np.eye(d)
    prec = np.linalg.inv(cov)
    prec = (prec + prec.T) / 2
    whiten = np.linalg.cholesky(prec)  # prec = W Wᵀ, so (f - μ) prec (f - μ)ᵀ = ‖(f - μ) W‖²
    return torch.from_numpy(whiten).float(), torch.from_numpy(mu @ whiten).float()


def threshold_for_tpr(scores: np.ndarray, tpr: float) -> float:
    """The threshold that keeps ``tpr`` of the in-distribution ``scores`` as known (score >= threshold).

    Raises:
        ValueError: ``tpr`` outside (0, 1] or no scores.
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"the open-set TPR must be in (0, 1], got {tpr}")
    if not len(scores):
        raise ValueError("no validation rows to choose the open-set threshold on")
    return float(np.quantile(np.asarray(scores, dtype=np.float64), 1 - tpr, method="lower"))


def penultimate_features(model: nn.Module, images: np.ndarray, mean: tuple[float, ...], std: tuple[float, ...],
                         *, batch_size: int = 128) -> np.ndarray:
    """``(N, H, W, C)`` uint8 images → ``(N, D)`` float32 penultimate features of ``model`` (a fresh network:
    :func:`split_head` modifies it), normalised as the worker does, on the CPU."""
    body, _ = split_head(model)
    body.eval()
    c = images.shape[3] if images.ndim == 4 else len(mean)
    m = torch.tensor(mean, dtype=torch.float32).view(1, c, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, c, 1, 1)
    out = []
    with torch.inference_mode():
        for i in range(0, len(images), batch_size):
            x = to_model_input(torch.from_numpy(np.ascontiguousarray(images[i : i + batch_size])), m, s)
            out.append(body(x).float().reshape(len(x), -1))
    return torch.cat(out).numpy() if out else np.zeros((0, 0), np.float32)


def fit_open_set(model_factory: Any, mean: tuple[float, ...], std: tuple[float, ...], num_classes: int,
                 fit: tuple[np.ndarray, np.ndarray], val_images: np.ndarray, *, tpr: float = DEFAULT_TPR) -> OpenSet:
    """Fit the Mahalanobis score on ``fit`` (uint8 images and labels, the training split) and choose its threshold
    for ``tpr`` on ``val_images`` (the validation split). ``model_factory()`` returns a fresh network.

    Raises:
        ValueError: a class without rows, no validation images, or ``tpr`` outside (0, 1].
    """
    images, labels = fit
    whiten, centers = fit_mahalanobis(penultimate_features(model_factory(), images, mean, std), labels, num_classes)
    val = penultimate_features(model_factory(), val_images, mean, std)
    if not len(val):
        raise ValueError("no validation rows to choose the open-set threshold on")
    scores = mahalanobis_score(torch.from_numpy(val), whiten, centers).numpy()
    return OpenSet(method="mahalanobis", threshold=threshold_for_tpr(scores, tpr), tpr=tpr, whiten=whiten,
                   centers=centers, n_fit=len(labels), n_val=len(val))
