"""How far frozen ImageNet features carry to real photos: linear probes and the zero-shot ImageNet classes.

Run it from the repository root (it prints the figures; nothing is timed or asserted)::

    .venv/bin/python -m pipeline.bench.probes /tmp/fw/train /tmp/rp/real_photos_dev \\
        --weights ../shared/weights/mobilenet_v2_imagenet.pth --per-class 600

For each input rule (the size and how a photo of another aspect ratio is brought to it: ``squash``, the worker's
rule; ``pad`` on white, keeping the aspect ratio), it decodes ``--per-class`` seeded catalogue photos of each class
of TRAIN_DIR and every photo of REAL_DIR's classes of the same names with OpenCV, takes MobileNetV2's pooled
penultimate features (1280 floats) without training anything, fits a logistic regression (scikit-learn, L2, ``C``
in ``--c``) on the catalogue features and reports its top-1 on the real photos. ``zero-shot`` maps ImageNet's own
classes onto footwear (Boot: cowboy boot 514; Sandal: sandal 774; Shoe: running shoe 770 + loafer 630 + clog 502)
and needs no catalogue photo at all; it is printed only when the classes are Boot, Sandal and Shoe.

What it measures is a ceiling for recipes that keep the backbone's features: if a probe on frozen features reaches
only ~0.7 on the real photos, no head trained on the catalogue alone will reach 0.9 with them.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

__all__ = ["features", "load", "main"]

MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)
ZERO_SHOT = {"Boot": [514], "Sandal": [774], "Shoe": [770, 630, 502]}
SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp"}


def load(path: Path, size: tuple[int, int], rule: str) -> np.ndarray:
    """``path`` as uint8 RGB ``(H, W, 3)`` at ``size`` ``(H, W)``: ``squash`` (aspect ratio not kept) or ``pad``
    (fitted inside, centred on white)."""
    bgr = cv2.imread(str(path), cv2.IMREAD_COLOR)
    if bgr is None:
        raise OSError(f"cannot decode {path}")
    img = bgr[:, :, ::-1]
    hh, ww = size
    if rule == "squash":
        return cv2.resize(img, (ww, hh), interpolation=cv2.INTER_AREA)
    h, w = img.shape[:2]
    s = min(hh / h, ww / w)
    nh, nw = max(1, round(h * s)), max(1, round(w * s))
    out = np.full((hh, ww, 3), 255, np.uint8)
    y, x = (hh - nh) // 2, (ww - nw) // 2
    out[y:y + nh, x:x + nw] = cv2.resize(img, (nw, nh), interpolation=cv2.INTER_AREA)
    return out


@torch.inference_mode()
def features(model: Any, images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Pooled penultimate features ``(N, 1280)`` float32 and ImageNet logits ``(N, 1000)`` of uint8 RGB images."""
    feats, logits = [], []
    for i in range(0, len(images), 64):
        x = np.stack(images[i:i + 64]).astype(np.float32) / 255
        t = torch.from_numpy(((x - MEAN) / STD).transpose(0, 3, 1, 2).copy())
        f = model.features(t).mean((2, 3))
        feats.append(f.numpy())
        logits.append(model.classifier(f).numpy())
    return np.concatenate(feats), np.concatenate(logits)


def _photos(root: Path, classes: list[str], per_class: int | None, seed: int) -> list[tuple[Path, int]]:
    rng = np.random.default_rng(seed)
    out = []
    for k, name in enumerate(classes):
        paths = sorted(p for p in (root / name).iterdir() if p.suffix.lower() in SUFFIXES)
        if per_class:
            rng.shuffle(paths)
            paths = paths[:per_class]
        out += [(p, k) for p in paths]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("train_dir", type=Path)
    parser.add_argument("real_dir", type=Path)
    parser.add_argument("--weights", required=True, help="torchvision mobilenet_v2 ImageNet state dict (.pth)")
    parser.add_argument("--per-class", type=int, default=600)
    parser.add_argument("--rules", default="102x136:squash,224x224:squash,224x224:pad,160x160:pad")
    parser.add_argument("--c", default="0.1,1.0", help="logistic regression C values")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import torchvision
    from sklearn.linear_model import LogisticRegression

    torch.manual_seed(args.seed)
    model = torchvision.models.mobilenet_v2()
    model.load_state_dict(torch.load(args.weights, map_location="cpu", weights_only=True))
    model.eval()
    classes = sorted(p.name for p in args.train_dir.iterdir() if p.is_dir())
    train = _photos(args.train_dir, classes, args.per_class, args.seed)
    real = _photos(args.real_dir, classes, None, args.seed)
    y_train, y_real = np.array([k for _, k in train]), np.array([k for _, k in real])
    print(f"classes {classes}: {len(train)} catalogue photos, {len(real)} real photos")
    for rule in args.rules.split(","):
        size_s, how = rule.split(":")
        size = (int(size_s.split("x")[0]), int(size_s.split("x")[1]))
        start = time.perf_counter()
        # catalogue photos share one aspect ratio: squashed, as the worker does
        x_train, _ = features(model, [load(p, size, "squash") for p, _ in train])
        x_real, logits = features(model, [load(p, size, how) for p, _ in real])
        line = f"{size_s} {how}: "
        for c in (float(v) for v in args.c.split(",")):
            probe = LogisticRegression(C=c, max_iter=3000).fit(x_train, y_train)
            line += f"probe C={c:g} top-1 {np.mean(probe.predict(x_real) == y_real):.3f}; "
        if classes == sorted(ZERO_SHOT):
            probs = torch.softmax(torch.from_numpy(logits), 1).numpy()
            zero = np.stack([probs[:, ZERO_SHOT[c]].sum(1) for c in classes], 1).argmax(1)
            line += f"zero-shot top-1 {np.mean(zero == y_real):.3f}; "
        print(line + f"{time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
