"""The faster CPU runtimes (INVSORT_RUNTIME=onnxruntime / openvino): same answers as PyTorch through the real
pipeline, the ONNX export cache, and the errors for a bad value, a missing package and a disagreeing runtime.
Without torch (the export beside the model, its record, stale and missing exports): tests/test_lean.py.

Needs the 'onnx' extra (onnx, onnxscript, onnxruntime, openvino) installed.
"""

import shutil
import sys
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from db.catalog import iter_items
from db.session import dispose_engines, session_scope
from pipeline.errors import ConfigError
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.models.modelfile import load_model_file, model_version, resolve_model_path
from pipeline.models.runtimes import RUNTIMES, export_onnx, onnx_path
from tests.images import EXAMPLES
from worker.cli import main

FAST = [r for r in RUNTIMES if r != "torch"]
BUNDLED = "bundled:fashion_mnist_cnn"


def sort_examples(db_url: str, env: dict[str, str]):
    result = CliRunner().invoke(main, ["sort", str(EXAMPLES), "--db", db_url, "--no-progress"], env=env,
                                catch_exceptions=False)
    assert result.exit_code == 0, result.output
    with session_scope(db_url) as session:
        return {r.item_id: r for r in iter_items(session=session)}


@pytest.fixture(scope="module")
def torch_rows(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('torch-rows') / 'torch.db'}"
    yield sort_examples(url, {"INVSORT_RUNTIME": "torch"})
    dispose_engines(url)


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory) -> Path:
    """One export cache for both runtimes' sorts: it stays empty, since the bundled model's export ships beside it
    (pipeline/assets/fashion_mnist_cnn.onnx)."""
    return tmp_path_factory.mktemp("onnx-cache")


@pytest.fixture(scope="module")
def other_network_onnx(tmp_path_factory) -> Path:
    """The bundled model's network with every weight moved by 0.05, exported to ONNX once for the module."""
    other = load_model_file(BUNDLED)
    other.state_dict = {k: v + 0.05 if v.is_floating_point() else v for k, v in other.state_dict.items()}
    path = tmp_path_factory.mktemp("other-network") / "other.onnx"
    export_onnx(other, path)
    return path


@pytest.mark.parametrize("runtime", FAST)
def test_fast_runtime_sorts_the_examples_like_pytorch(runtime, torch_rows, sqlite_url, shared_cache):
    rows = sort_examples(sqlite_url, {"INVSORT_RUNTIME": runtime, "INVSORT_RUNTIME_CACHE_DIR": str(shared_cache)})
    assert set(rows) == set(torch_rows) and len(rows) == 50
    assert {k: r.category for k, r in rows.items()} == {k: r.category for k, r in torch_rows.items()}
    assert all(abs(r.confidence - torch_rows[k].confidence) < 1e-4 for k, r in rows.items())
    assert {k: r.status for k, r in rows.items()} == {k: r.status for k, r in torch_rows.items()}
    assert all(r.model_version == load_model_file(BUNDLED).version for r in rows.values())
    assert not list(shared_cache.glob("*"))  # the export beside the bundled model was used


def test_export_is_cached_per_model_version_and_shared_by_the_runtimes(tmp_path):
    mf = load_model_file(BUNDLED)
    first = Predictor(mf, PredictorOptions(device="cpu", runtime="onnxruntime", runtime_cache_dir=tmp_path))
    assert first.session is not None and first.session.exported
    path = onnx_path(mf, tmp_path)
    assert first.session.onnx_path == path and path.name.startswith(model_version(mf))  # recomputed from the weights
    written = path.stat().st_mtime_ns

    for runtime in FAST:
        again = Predictor(mf, PredictorOptions(device="cpu", runtime=runtime, runtime_cache_dir=tmp_path))
        assert again.session is not None and not again.session.exported, runtime
        assert again.session.check is not None and again.session.check.top1_agree == again.session.check.n
    assert path.stat().st_mtime_ns == written
    # the export and its record, no temporary files left behind
    assert sorted(p.name for p in tmp_path.iterdir()) == [path.name, path.name + ".json"]


def test_a_damaged_cached_export_is_exported_again(tmp_path):
    mf = load_model_file(BUNDLED)
    path = onnx_path(mf, tmp_path)
    path.write_bytes(b"not an onnx file")
    predictor = Predictor(mf, PredictorOptions(device="cpu", runtime="onnxruntime", runtime_cache_dir=tmp_path))
    assert predictor.session is not None and predictor.session.exported
    assert predictor.predict_probs(torch.zeros(2, 28, 28, 1, dtype=torch.uint8)).shape == (2, 10)


@pytest.mark.parametrize("runtime", FAST)
def test_a_runtime_that_disagrees_with_pytorch_is_refused(runtime, other_network_onnx, tmp_path):
    mf = load_model_file(BUNDLED)
    shutil.copy(other_network_onnx, onnx_path(mf, tmp_path))  # a cached file that is not this model's network
    with pytest.raises(ConfigError, match=f"INVSORT_RUNTIME={runtime} disagrees with PyTorch.*INVSORT_RUNTIME=torch"):
        Predictor(mf, PredictorOptions(device="cpu", runtime=runtime, runtime_cache_dir=tmp_path))


def test_bad_runtime_value_is_refused_with_the_valid_ones(tmp_path):
    env = {"INVSORT_RUNTIME": "tensorrt", "INVSORT_DATABASE_URL": f"sqlite:///{tmp_path}/x.db"}
    result = CliRunner().invoke(main, ["sort", str(EXAMPLES)], env=env)
    assert result.exit_code != 0
    assert "INVSORT_RUNTIME: Input should be 'torch', 'onnxruntime' or 'openvino' (got 'tensorrt')" in result.output
    assert "Traceback" not in result.output
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'; valid: torch, onnxruntime, openvino"):
        Predictor(load_model_file(BUNDLED), PredictorOptions(runtime="tensorrt"))


@pytest.mark.parametrize("runtime", FAST)
def test_a_cpu_runtime_with_device_cuda_is_refused(runtime):
    with pytest.raises(ConfigError, match=f"INVSORT_RUNTIME={runtime} runs on the CPU"):
        Predictor(load_model_file(BUNDLED), PredictorOptions(device="cuda", runtime=runtime))


@pytest.mark.parametrize(
    ("runtime", "missing"),
    [("onnxruntime", "onnxruntime"), ("openvino", "openvino"), ("onnxruntime", "onnxscript"), ("openvino", "onnx")],
)
def test_a_missing_package_names_the_extra_to_install(runtime, missing, tmp_path, monkeypatch):
    """The runtime is needed to run an export, onnx and onnxscript to make one: a model file with no export."""
    model = tmp_path / "m.pt"
    shutil.copy(resolve_model_path(BUNDLED), model)
    monkeypatch.setitem(sys.modules, missing, None)  # the package is not installed, as far as import knows
    env = {"INVSORT_RUNTIME": runtime, "INVSORT_RUNTIME_CACHE_DIR": str(tmp_path / "c")}
    result = CliRunner().invoke(main, ["sort", str(EXAMPLES), "--db", f"sqlite:///{tmp_path}/x.db", "--model",
                                       str(model)], env=env)
    assert result.exit_code != 0
    extra = "cpu" if missing == runtime else "onnx"  # running an export needs the runtime, making one onnx too
    assert f"INVSORT_RUNTIME={runtime} needs the '{extra}' extra: pip install -e '.[{extra}]'" in result.output
    assert missing in result.output and "Traceback" not in result.output
    assert not list(Path(tmp_path / "c").glob("*"))
    dispose_engines(f"sqlite:///{tmp_path}/x.db")
