"""Lean CPU processes: with INVSORT_RUNTIME=onnxruntime / openvino, ``invsort sort``, a worker's batch and
``invsort submit`` never import torch, and give the torch runtime's rows; the ONNX export beside a model file is
used only for the version it was made from (a missing or stale one is refused, with the command that makes it,
where torch is not installed); the open-set score runs in the export too.

Each lean path runs in a child process of its own, since this one has torch imported. "Torch is not installed" is
``sys.modules["torch"] = None`` there (an import of it fails, as without the package). Memory and speed are
measured by ``python -m pipeline.bench.lean`` and ``python -m pipeline.bench.submit``, never here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from db.catalog import iter_items
from db.session import dispose_engines, session_scope
from pipeline.errors import ConfigError
from pipeline.inference.lean import LeanPredictor, PredictorOptions
from pipeline.inference.predictor import Predictor
from pipeline.models.fileversion import model_file_version, resolve_model_path
from pipeline.models.meta import load_model_meta
from pipeline.models.modelfile import load_model_file, save_model_file
from pipeline.models.openset import OpenSet, split_head
from pipeline.models.runtimes import (
    ExportRecord,
    beside_path,
    export_beside,
    export_model_file,
    export_onnx,
    load_session,
    record_path,
)
from tests.images import EXAMPLES, ROOT
from worker.cli import main

BUNDLED = "bundled:fashion_mnist_cnn"
FAST = ["onnxruntime", "openvino"]
NO_TORCH = "import sys; sys.modules['torch'] = None  # torch is not installed, as far as import knows\n"


def child(code: str, env: dict[str, str] | None = None, *, no_torch: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter at the repository root; it prints one JSON object last."""
    prelude = NO_TORCH if no_torch else ""
    out = subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})})
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-4000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def rows_of(url: str) -> dict[str, tuple[str, str | None, float | None, str | None]]:
    with session_scope(url) as session:
        rows = {r.item_id: (r.status, r.category, r.confidence, r.model_version) for r in iter_items(session=session)}
    dispose_engines(url)
    return rows


@pytest.fixture(scope="module")
def torch_rows(tmp_path_factory):
    url = f"sqlite:///{tmp_path_factory.mktemp('torch') / 'torch.db'}"
    result = CliRunner().invoke(main, ["sort", str(EXAMPLES), "--db", url, "--no-progress"],
                                env={"INVSORT_RUNTIME": "torch"}, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return rows_of(url)


def assert_same_rows(rows, torch_rows):
    assert set(rows) == set(torch_rows) and len(rows) == 50
    for key, (status, category, confidence, version) in rows.items():
        t_status, t_category, t_confidence, t_version = torch_rows[key]
        assert (status, category, version) == (t_status, t_category, t_version), key
        assert abs(confidence - t_confidence) < 1e-4, key


@pytest.mark.parametrize("runtime", FAST)
def test_lean_sort_never_imports_torch_and_gives_the_torch_rows(runtime, torch_rows, tmp_path):
    url = f"sqlite:///{tmp_path / 'lean.db'}"
    env = {"INVSORT_RUNTIME": runtime, "INVSORT_RUNTIME_CACHE_DIR": str(tmp_path / "cache")}
    got = child(f"""
        import json, sys
        from click.testing import CliRunner
        from worker.cli import main
        result = CliRunner().invoke(main, ["sort", {str(EXAMPLES)!r}, "--db", {url!r}, "--no-progress"])
        assert result.exit_code == 0, result.output
        print(json.dumps({{"torch": "torch" in sys.modules, "output": result.output}}))
    """, env)
    assert not got["torch"], "the lean sort path imported torch"
    assert "sorted 50 images" in got["output"]
    assert_same_rows(rows_of(url), torch_rows)
    assert not (tmp_path / "cache").exists()  # the bundled model's export beside it was used


def test_a_worker_batch_and_submit_never_import_torch(torch_rows, tmp_path):
    """``invsort submit`` (the model's version read without torch) and then a worker running the stored batches
    (:func:`pipeline.jobs.run_batch`), with the worker's modules imported as ``invsort worker`` imports them."""
    url = f"sqlite:///{tmp_path / 'queued.db'}"
    env = {"INVSORT_RUNTIME": "onnxruntime", "INVSORT_DATABASE_URL": url, "INVSORT_ITEMS_PER_TASK": "20",
           "INVSORT_LOCAL_ROOTS": str(EXAMPLES)}
    got = child(f"""
        import json, sys
        from db.migrate import upgrade
        from pipeline.settings import get_settings
        from pipeline.sorting import submit_job
        upgrade({url!r})
        queued = []
        job_id, total, batches = submit_job({str(EXAMPLES)!r}, settings=get_settings(), model_spec={BUNDLED!r},
                                            enqueue=lambda *task: queued.append(task))
        after_submit = "torch" in sys.modules
        import worker.app, worker.reconciler, worker.tasks  # what a worker process imports
        from pipeline.jobs import run_batch
        from pipeline.sorting import configure_torch_threads
        configure_torch_threads(share=2)
        counts = [dict(run_batch(job_id, n, settings=get_settings())) for n in range(batches)]
        print(json.dumps({{"after_submit": after_submit, "torch": "torch" in sys.modules, "queued": len(queued),
                          "total": total, "counts": counts}}))
    """, env)
    assert not got["after_submit"], "submit imported torch"
    assert not got["torch"], "the worker's batch path imported torch"
    assert (got["total"], got["queued"]) == (50, 3)
    assert sum(sum(c.values()) for c in got["counts"]) == 50
    assert_same_rows(rows_of(url), torch_rows)


def test_submit_pins_the_version_load_model_file_finds(tmp_path):
    assert load_model_meta(BUNDLED).version == model_file_version(BUNDLED) == load_model_file(BUNDLED).version
    meta, mf = load_model_meta(BUNDLED), load_model_file(BUNDLED)
    assert (meta.name, meta.class_names, meta.input_size, meta.mean, meta.std, meta.review_threshold) == (
        mf.name, mf.class_names, mf.input_size, mf.mean, mf.std, mf.review_threshold)


def test_the_bundled_model_ships_its_checked_export():
    path = Path(beside_path(BUNDLED))
    assert path == Path(resolve_model_path(BUNDLED)).with_suffix(".onnx") and path.is_file()
    record = ExportRecord.from_json(Path(record_path(path)).read_text())
    # after retraining the bundled model: invsort export-onnx bundled:fashion_mnist_cnn
    assert record.model_version == model_file_version(BUNDLED)
    assert record.output_width == 10 and record.input_shape == (1, 28, 28) and record.checked


# --- an export made by `invsort export-onnx`, stale and missing ones, without torch -----------------------------


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> Path:
    """A copy of the bundled model in a folder of its own, exported beside it by the command."""
    model = tmp_path_factory.mktemp("exported") / "shoes.pt"
    shutil.copy(resolve_model_path(BUNDLED), model)
    result = CliRunner().invoke(main, ["export-onnx", str(model)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert f"to {model.with_suffix('.onnx')} and {model.with_suffix('.onnx')}.json" in result.output
    assert "checked with onnxruntime" in result.output
    return model


LEAN_PREDICT = """
    import json, sys
    from pipeline.inference.lean import PredictorOptions, load_lean_predictor
    try:
        p = load_lean_predictor({model!r}, PredictorOptions(runtime="onnxruntime", runtime_cache_dir={cache!r}))
        print(json.dumps({{"version": p.model_file.version, "torch": sys.modules.get("torch") is not None}}))
    except Exception as exc:
        print(json.dumps({{"error": f"{{type(exc).__name__}}: {{exc}}"}}))
"""


def test_an_export_beside_the_model_runs_where_torch_is_not_installed(exported, tmp_path):
    got = child(LEAN_PREDICT.format(model=str(exported), cache=str(tmp_path / "cache")), no_torch=True)
    assert got == {"version": model_file_version(str(exported)), "torch": False}


def test_a_missing_export_is_refused_where_torch_is_not_installed_with_the_command_that_makes_it(tmp_path):
    model = tmp_path / "new.pt"
    shutil.copy(resolve_model_path(BUNDLED), model)
    got = child(LEAN_PREDICT.format(model=str(model), cache=str(tmp_path / "cache")), no_torch=True)
    error = got["error"]
    assert error.startswith("ConfigError: INVSORT_RUNTIME=onnxruntime runs the ONNX export of model file")
    assert f"none at {tmp_path / 'new.onnx'}" in error and "torch is not installed" in error
    assert f"'invsort export-onnx {model}'" in error and "INVSORT_RUNTIME=torch" in error


def test_a_stale_export_is_refused_where_torch_is_not_installed(exported, tmp_path):
    """The model file was saved again with another review threshold (a new version) after the export."""
    model = tmp_path / "shoes.pt"
    mf = load_model_file(str(exported))
    mf.review_threshold = 0.5
    new_version = save_model_file(mf, model)
    for suffix in (".onnx", ".onnx.json"):
        shutil.copy(exported.with_suffix(suffix), model.with_suffix(suffix))
    old_version = model_file_version(str(exported))
    got = child(LEAN_PREDICT.format(model=str(model), cache=str(tmp_path / "cache")), no_torch=True)
    assert new_version != old_version
    assert f"(version {new_version})" in got["error"]
    assert f"{model.with_suffix('.onnx')} is stale: exported from version {old_version}" in got["error"]
    assert "invsort export-onnx" in got["error"]


def test_a_process_with_torch_exports_a_missing_one_into_the_cache_once(tmp_path):
    model = tmp_path / "new.pt"
    shutil.copy(resolve_model_path(BUNDLED), model)
    meta = load_model_meta(str(model))
    opts = PredictorOptions(runtime="onnxruntime", runtime_cache_dir=tmp_path / "cache")
    first = LeanPredictor(meta, opts, spec=str(model))
    assert first.session.exported and first.session.onnx_path.parent == tmp_path / "cache"
    again = LeanPredictor(meta, opts, spec=str(model))
    assert not again.session.exported and again.session.onnx_path == first.session.onnx_path
    assert again.session.check is not None and again.session.check.top1_agree == again.session.check.n


def test_an_export_that_is_not_its_records_network_is_refused(exported, tmp_path):
    """A record of the right version beside another network's graph: the load's check against the recorded
    PyTorch outputs refuses it."""
    model = tmp_path / "shoes.pt"
    shutil.copy(exported, model)
    shutil.copy(record_path(exported.with_suffix(".onnx")), record_path(model.with_suffix(".onnx")))
    other = load_model_file(str(exported))
    other.state_dict = {k: v + 0.05 if v.is_floating_point() else v for k, v in other.state_dict.items()}
    export_onnx(other, tmp_path / "other.onnx")
    shutil.copy(tmp_path / "other.onnx", model.with_suffix(".onnx"))
    with pytest.raises(ConfigError, match="INVSORT_RUNTIME=onnxruntime disagrees with PyTorch"):
        load_session(load_model_meta(str(model)), "onnxruntime", spec=str(model), cache_dir=tmp_path / "cache")


def test_the_export_beside_an_s3_model_is_copied_into_the_cache_and_used(exported, s3_server, s3_bucket, tmp_path):
    from pipeline.inference.lean import load_lean_predictor
    from pipeline.io.storage import LocalStorage, ObjectReader, S3Storage

    client, bucket = s3_bucket
    for name in ("shoes.pt", "shoes.onnx", "shoes.onnx.json"):
        client.put_object(Bucket=bucket, Key=f"models/{name}", Body=(exported.parent / name).read_bytes())
    reader = ObjectReader(LocalStorage([]), s3=S3Storage(client))
    spec = f"s3://{bucket}/models/shoes.pt"
    opts = PredictorOptions(runtime="onnxruntime", runtime_cache_dir=tmp_path / "cache")
    predictor = load_lean_predictor(spec, opts, reader=reader)
    version = model_file_version(str(exported))
    assert (predictor.model_file.version, predictor.model_file.name) == (version, "invsort_cnn:shoes")
    assert not predictor.session.exported  # torch made nothing: the S3 export was used
    assert predictor.session.onnx_path == tmp_path / "cache" / f"{version}.opset18.onnx"
    assert Path(record_path(predictor.session.onnx_path)).is_file()


def test_train_ends_with_the_export_beside_the_model_or_says_how_to_make_it(tmp_path, monkeypatch):
    """What ``invsort train`` runs after saving the model file (:func:`pipeline.models.runtimes.export_beside`)."""
    mf = load_model_file(BUNDLED)
    out = tmp_path / "trained.pt"
    version = save_model_file(mf, out)
    lines: list[str] = []
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # the onnx extra is not installed
    assert export_beside(mf, out, lines.append) is None
    assert "onnxscript not installed" in lines[-1] and f"'invsort export-onnx {out}'" in lines[-1]
    monkeypatch.undo()
    assert export_beside(mf, out, lines.append) == tmp_path / "trained.onnx"
    assert ExportRecord.from_json((tmp_path / "trained.onnx.json").read_text()).model_version == version


def test_export_onnx_of_an_s3_model_needs_out():
    with pytest.raises(ConfigError, match=r"give --out FILE.onnx.*s3://models/shoes.onnx"):
        export_model_file("s3://models/shoes.pt")


# --- the open-set score in the export -----------------------------------------------------------------------------


def test_the_open_set_score_runs_in_the_export_like_in_torch(tmp_path):
    """A model file with an open-set score (its threshold between the examples' scores, so that some are
    unknown): the lean predictor's probabilities, scores and rows equal the torch predictor's."""
    from pipeline.io.images import decode_image

    mf = load_model_file(BUNDLED)
    _, head = split_head(mf.build())
    d = head.in_features
    gen = torch.Generator().manual_seed(0)
    mf.open_set = OpenSet(method="mahalanobis", threshold=0.0, tpr=0.95, whiten=torch.eye(d) * 0.05,
                          centers=torch.randn(mf.num_classes, d, generator=gen) * 0.05)
    images = np.stack([decode_image(p.read_bytes(), size=mf.input_size, in_chans=mf.in_chans)
                       for p in sorted(EXAMPLES.rglob("*.png"))])
    scores = Predictor(mf, PredictorOptions(device="cpu")).predict_scored(torch.from_numpy(images))[:, -1]
    ordered = np.sort(scores.numpy())[15:36]
    gap = int(np.argmax(np.diff(ordered)))  # the threshold midway across the widest gap: no row sits on it
    mf.open_set.threshold = float((ordered[gap] + ordered[gap + 1]) / 2)
    model = tmp_path / "open.pt"
    save_model_file(mf, model)
    export_model_file(str(model))

    reference = Predictor(load_model_file(str(model)), PredictorOptions(device="cpu"))
    lean = LeanPredictor(load_model_meta(str(model)), PredictorOptions(runtime="onnxruntime",
                                                                        runtime_cache_dir=tmp_path / "c"),
                         spec=str(model))
    assert lean.session.record is not None and lean.session.record.output_width == mf.num_classes + 1
    want, got = reference.predict_scored(torch.from_numpy(images)).numpy(), lean.predict_scored(images)
    assert got.shape == want.shape == (50, mf.num_classes + 1)
    assert np.abs(got[:, :-1] - want[:, :-1]).max() < 1e-4
    assert np.abs(got[:, -1] - want[:, -1]).max() < 1e-3 * (1 + np.abs(want[:, -1]).max())
    unknown = lean.unknown(got)
    assert unknown == reference.unknown(torch.from_numpy(want)) and 0 < sum(unknown) < 50
    from pipeline.records import Item

    items = [Item(f"i{k}", f"u{k}") for k in range(50)]
    lean_rows = lean.results(items, got, "job")
    torch_rows = reference.results(items, torch.from_numpy(want), "job")
    assert [(r.status, r.error, r.category) for r in lean_rows] == [(r.status, r.error, r.category)
                                                                    for r in torch_rows]
    assert all(abs(a.confidence - b.confidence) < 1e-4 for a, b in zip(lean_rows, torch_rows, strict=True)
               if a.confidence is not None and b.confidence is not None)


def test_the_web_app_on_a_cpu_runtime_never_imports_torch_and_classifies_like_torch(tmp_path):
    """``invsort serve`` with INVSORT_RUNTIME=onnxruntime: the app, its classify batcher and its pages run the
    model's export; torch is never imported (here: it could not be, as where it is not installed)."""
    photo = sorted((EXAMPLES / "Sandal").iterdir())[0]
    env = {"INVSORT_RUNTIME": "onnxruntime", "INVSORT_DATABASE_URL": f"sqlite:///{tmp_path / 'web.db'}"}
    got = child(f"""
        import json, sys
        from fastapi.testclient import TestClient
        from db.migrate import upgrade
        from pipeline.settings import get_settings
        from worker.web.app import create_app
        upgrade(get_settings().database_url)
        with TestClient(create_app(get_settings())) as client:
            answer = client.post("/v1/classify", files=[("file", ("p.png", open({str(photo)!r}, "rb").read()))])
            pages = [client.get(p).status_code for p in ("/", "/catalog", "/review", "/models", "/healthz")]
        print(json.dumps({{"torch": sys.modules.get("torch") is not None, "status": answer.status_code,
                          "results": answer.json()["results"], "pages": pages}}))
    """, env, no_torch=True)
    assert not got["torch"] and got["status"] == 200 and got["pages"] == [200] * 5
    (result,) = got["results"]
    from pipeline.inference.predictor import Predictor
    from pipeline.io.images import decode_image
    from pipeline.models.modelfile import load_model_file
    from pipeline.records import Item

    torch_predictor = Predictor(load_model_file(BUNDLED))
    image = decode_image(photo.read_bytes(), size=torch_predictor.input_size, in_chans=1)
    (row,) = torch_predictor.results([Item("p", "p")], torch_predictor.predict_scored(np.stack([image])), None)
    assert (result["category"], result["status"]) == (row.category, row.status)
    assert abs(result["confidence"] - row.confidence) < 1e-4
