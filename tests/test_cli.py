"""The ``invsort`` command line as a user runs it: real subprocesses, real databases, exit codes and stderr."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from db import catalog
from db.session import session_scope
from pipeline.models.modelfile import load_model_file, save_model_file
from tests.images import EXAMPLES

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()


def invsort(*args: object, env: dict[str, str] | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("INVSORT_")}
    return subprocess.run([sys.executable, "-m", "worker.cli", *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, env={**clean, **(env or {})}, timeout=timeout, check=False)


def one_line_error(result: subprocess.CompletedProcess, code: int = 1) -> str:
    """The single ``Error: ...`` line of a refused command (no traceback, nothing else on stderr)."""
    assert result.returncode == code, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------- status --json


def test_status_json_prints_one_object_per_job(db_url):
    with session_scope(db_url) as session:
        job_id = catalog.create_job(session=session, source="s3://b/p/", model_path="bundled:fashion_mnist_cnn",
                                    model_name="fashion_mnist_cnn", model_version="abc")
        catalog.finish_listing(session=session, job_id=job_id, total_items=3, total_batches=1)
        catalog.record_batch(session=session, job_id=job_id, batch_no=0, sorted_count=2, needs_review_count=0,
                             failed_count=1)

    one = invsort("status", job_id, "--db", db_url, "--json")
    assert one.returncode == 0, one.stderr
    record = json.loads(one.stdout)
    assert record["id"] == job_id and record["status"] == "running" and record["processed"] == 3
    assert (record["sorted_count"], record["failed_count"], record["total_items"]) == (2, 1, 3)
    assert record["created_at"].endswith("+00:00") and record["finished_at"] is None
    assert set(record) == {f.name for f in dataclasses.fields(catalog.JobStatus)} | {"processed"}

    latest = invsort("status", "--db", db_url, "--json")
    assert latest.returncode == 0, latest.stderr
    assert job_id in [json.loads(line)["id"] for line in latest.stdout.splitlines()]


# ------------------------------------------------------------------------------------------------- --device


@pytest.mark.parametrize("command", [
    ["sort", EXAMPLES],
    ["evaluate", "bundled:fashion_mnist_cnn", EXAMPLES, "--out", "OUT"],
    ["train", EXAMPLES, "--out", "OUT"],
])
@pytest.mark.parametrize("device", ["cuda:x", "gpu", "cuda:-1"])
def test_every_device_option_refuses_the_same_bad_names(command, device, tmp_path):
    result = invsort(*[tmp_path / "out" if a == "OUT" else a for a in command], "--device", device)
    assert result.returncode == 2 and "Traceback" not in result.stderr  # a usage error, before any work
    assert (f"Invalid value for '--device': device must be auto, cpu, cuda or cuda:N (N: a GPU index, 0 first), "
            f"got '{device}'") in result.stderr


@pytest.mark.skipif(HAS_GPU, reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize(("args", "env"), [
    (["sort", EXAMPLES, "--device", "cuda:0"], {}),
    (["sort", EXAMPLES], {"INVSORT_DEVICE": "cuda:0"}),
    (["evaluate", "bundled:fashion_mnist_cnn", EXAMPLES, "--out", "OUT", "--device", "cuda:0"], {}),
])
def test_cuda_n_without_a_gpu_is_one_clear_line(args, env, tmp_path):
    args = [tmp_path / "report" if a == "OUT" else a for a in args]
    if args[0] == "sort":
        args += ["--db", f"sqlite:///{tmp_path}/c.db", "--no-progress"]
    result = invsort(*args, env=env)
    expected = "Error: device cuda:0 asked for, but no CUDA GPU is available here; use auto or cpu"
    assert one_line_error(result) == expected


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_n_names_a_gpu_that_exists(tmp_path):
    from pipeline.inference.predictor import resolve_device

    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    result = invsort("sort", EXAMPLES, "--device", f"cuda:{count}", "--db", f"sqlite:///{tmp_path}/c.db")
    assert f"this machine has {count} CUDA GPU(s)" in one_line_error(result)
    ok = invsort("sort", EXAMPLES, "--device", f"cuda:{count - 1}", "--db", f"sqlite:///{tmp_path}/c.db",
                 "--no-progress")
    assert ok.returncode == 0 and "sorted 50 images" in ok.stdout, ok.stderr


# ------------------------------------------------------------------------------------------- bad model files


@pytest.fixture
def mismatched_model(tmp_path) -> Path:
    """The bundled model's weights (10 outputs) under 3 class names."""
    mf = load_model_file("bundled:fashion_mnist_cnn")
    path = tmp_path / "three.pt"
    save_model_file(dataclasses.replace(mf, class_names=["Bag", "Coat", "Dress"]), path)
    return path


def test_a_class_count_that_does_not_fit_the_weights_is_one_line(mismatched_model, tmp_path):
    expected = f"Error: model file {mismatched_model}: 3 class names but the classifier has 10 outputs"
    assert one_line_error(invsort("model-info", mismatched_model)) == expected
    result = invsort("sort", EXAMPLES, "--model", mismatched_model, "--db", f"sqlite:///{tmp_path}/c.db",
                     "--no-progress")
    assert one_line_error(result) == expected


def test_weights_of_another_architecture_are_one_line(tmp_path):
    mf = load_model_file("bundled:fashion_mnist_cnn")
    path = tmp_path / "rgb.pt"
    save_model_file(dataclasses.replace(mf, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3), path)
    line = one_line_error(invsort("model-info", path))
    assert line.startswith(f"Error: model file {path}: the weights do not fit invsort_cnn with 3 channel(s)")
    assert "features.0.0.weight is (32, 1, 3, 3), invsort_cnn needs (32, 3, 3, 3)" in line


def test_a_good_model_file_is_described():
    result = invsort("model-info", "bundled:fashion_mnist_cnn")
    assert result.returncode == 0, result.stderr
    assert "classes (10): Ankle_boot, Bag, Coat" in result.stdout and "arch invsort_cnn" in result.stdout


# ----------------------------------------------------------------------------------------------- bad settings


def test_a_bad_setting_is_refused_before_any_work(tmp_path):
    result = invsort("sort", EXAMPLES, env={"INVSORT_MAX_IMAGE_PIXELS": "-1",
                                            "INVSORT_DATABASE_URL": f"sqlite:///{tmp_path}/c.db"})
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "INVSORT_MAX_IMAGE_PIXELS must be between 64 and 2147483648 pixels, got -1" in result.stderr
    assert not (tmp_path / "c.db").exists()
