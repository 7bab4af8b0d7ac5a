import pickle

import pytest
import torch

from pipeline.errors import ConfigError, ModelFileError
from pipeline.modelfile import ModelFile, load_model_file, save_model_file, weights_version
from pipeline.models import REGISTRY, create_model
from tests.images import MOBILENET_WEIGHTS


@pytest.mark.parametrize("arch", sorted(REGISTRY))
def test_every_architecture_builds_runs_and_round_trips(arch, tmp_path):
    spec = REGISTRY[arch]
    chans = len(spec.mean)
    model = create_model(arch, num_classes=4, in_chans=chans).eval()
    x = torch.randn(2, chans, 64, 64)
    with torch.inference_mode():
        y = model(x)
    assert y.shape == (2, 4) and y.dtype == torch.float32
    assert torch.isfinite(y).all()

    mf = ModelFile(arch=arch, class_names=["a", "b", "c", "d"], in_chans=chans, input_size=(64, 64),
                   mean=spec.mean, std=spec.std, state_dict=model.state_dict())
    version = save_model_file(mf, tmp_path / "m.pt")
    loaded = load_model_file(str(tmp_path / "m.pt"))
    assert loaded.version == version == weights_version(model.state_dict())
    assert loaded.class_names == ["a", "b", "c", "d"] and loaded.input_size == (64, 64)
    with torch.inference_mode():
        assert torch.allclose(loaded.build()(x), y, atol=1e-5)


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
    with pytest.raises(ModelFileError, match="not an invsort model file"):
        load_model_file(str(text))
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
    from pipeline.settings import build_settings
    from pipeline.storage import make_reader

    reader = make_reader(build_settings(s3_endpoint_url=client.meta.endpoint_url))
    remote = create_model("mobilenet_v2", num_classes=3, weights=f"s3://{bucket}/weights/mnv2.pth", reader=reader)
    assert torch.equal(remote.state_dict()["features.0.0.weight"], ref["features.0.0.weight"])


def test_weights_for_another_architecture_are_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(create_model("resnet18", num_classes=3).state_dict(), path)
    with pytest.raises(ModelFileError, match="do not fit mobilenet_v2"):
        create_model("mobilenet_v2", num_classes=3, weights=str(path))
