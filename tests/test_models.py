import logging
import pickle

import pytest
import torch
import torch.nn.functional as F
import torchvision.models as tvm

from pipeline.errors import ConfigError, ModelFileError
from pipeline.models.modelfile import ModelFile, load_model_file, model_version, save_model_file
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
