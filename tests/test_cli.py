"""The ``invsort`` command line (worker/cli.py): exit codes, stdout and stderr of each command, against real
databases and files.

Commands run in this process through click's ``CliRunner`` (stdout and stderr apart, no ``INVSORT_*`` variable of
the caller's environment, unexpected exceptions raised into the test). A few run as real processes, for what only a
process shows: a refused command prints one line and no traceback, and the README's first command works through the
installed ``invsort`` script. A database outage is made by a TCP relay (:class:`TcpProxy`) that the test starts on
its own port in front of PostgreSQL and cuts; the server itself is never touched.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner, Result
from sqlalchemy import text
from sqlalchemy.engine import make_url

from db import catalog
from db.session import session_scope
from pipeline.models.modelfile import load_model_file, save_model_file
from tests.fixtures.net import TcpProxy, free_port
from tests.images import EXAMPLES
from worker.cli import main

ROOT = Path(__file__).resolve().parents[1]
HAS_GPU = torch.cuda.is_available()


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("INVSORT_")}


def invoke(*args: object, env: dict[str, str] | None = None) -> Result:
    """``invsort ARGS`` in this process, with only ``env``'s INVSORT_* variables set."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("INVSORT_")}
    return CliRunner().invoke(main, [str(a) for a in args], env={**unset, **(env or {})}, catch_exceptions=False)


def run_process(*args: object, cwd: Path = ROOT, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """``invsort ARGS`` as a real process: the installed script where there is one, else ``python -m worker.cli``."""
    script = Path(sys.executable).with_name("invsort")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]
    return subprocess.run([*argv, *map(str, args)], cwd=cwd, capture_output=True, text=True,
                          env={**clean_env(), **(env or {})}, timeout=300, check=False)


def one_line_error(result: Result | subprocess.CompletedProcess, code: int = 1) -> str:
    """The single ``Error: ...`` line of a refused command (no traceback, nothing else on stderr)."""
    status = result.exit_code if isinstance(result, Result) else result.returncode
    assert status == code, (status, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    return lines[0]


def refused(result: Result, code: int = 1) -> str:
    """The ``Error: ...`` message of a refused command, one line or more (settings list every bad one)."""
    assert result.exit_code == code, (result.exit_code, result.stderr)
    assert "Traceback" not in result.stderr and result.stderr.startswith("Error: "), result.stderr
    return result.stderr


@pytest.fixture(autouse=True)
def _in_the_repository(monkeypatch):
    """Relative paths (examples/images, pyproject.toml) as a user in the clone types them."""
    monkeypatch.chdir(ROOT)


# ------------------------------------------------------------------------------------- status and results


def test_status_json_prints_one_object_per_job(db_url):
    with session_scope(db_url) as session:
        job_id = catalog.create_job(session=session, source="s3://b/p/", model_path="bundled:fashion_mnist_cnn",
                                    model_name="fashion_mnist_cnn", model_version="abc")
        catalog.finish_listing(session=session, job_id=job_id, total_items=3, total_batches=1)
        catalog.record_batch(session=session, job_id=job_id, batch_no=0, sorted_count=2, needs_review_count=0,
                             failed_count=1)

    one = invoke("status", job_id, "--db", db_url, "--json")
    assert one.exit_code == 0, one.stderr
    record = json.loads(one.stdout)
    assert record["id"] == job_id and record["status"] == "running" and record["processed"] == 3
    assert (record["sorted_count"], record["failed_count"], record["total_items"]) == (2, 1, 3)
    assert record["created_at"].endswith("+00:00") and record["finished_at"] is None
    assert set(record) == {f.name for f in dataclasses.fields(catalog.JobStatus)} | {"processed"}

    latest = invoke("status", "--db", db_url, "--json")
    assert latest.exit_code == 0, latest.stderr
    assert job_id in [json.loads(line)["id"] for line in latest.stdout.splitlines()]


def test_status_and_results_show_the_job(sqlite_url):
    result = invoke("sort", EXAMPLES, "--db", sqlite_url, "--no-progress", "--limit", 7)
    assert result.exit_code == 0, result.output
    job_id = result.stdout.split("job ")[1].split(";")[0]
    status = invoke("status", job_id, "--db", sqlite_url)
    assert status.exit_code == 0 and f"job {job_id} done: 7/7 images; 7 sorted" in status.stdout
    rows = invoke("results", "--db", sqlite_url, "--job", job_id, "--csv")
    assert rows.exit_code == 0 and len(rows.stdout.strip().splitlines()) == 1 + 7
    missing = invoke("status", "nope", "--db", sqlite_url)
    assert one_line_error(missing) == f"Error: no job nope in {sqlite_url}"


# ---------------------------------------------------------------------------------------- refused jobs


@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (["sort", "/no/such/folder"], {}, "source not found"),
        (["sort", "ftp://host/x"], {}, "unsupported URI scheme"),
        (["sort", "examples/images"], {"INVSORT_BATCH_SIZE": "0"}, "INVSORT_BATCH_SIZE must be between 1 and 4096"),
        (["sort", "examples/images"], {"INVSORT_DEVICE": "tpu"}, "INVSORT_DEVICE"),
        (["sort", "examples/images", "--model", "pyproject.toml"], {}, "not an invsort model file"),
        (["sort", "examples/images", "--model", "bundled:nope"], {}, "bundled:fashion_mnist_cnn"),
        (["sort", "examples/images", "--db", "mysql://x/y"], {}, "INVSORT_DATABASE_URL"),
        (["results"], {}, "invsort db upgrade"),
        (["status", "no-such-job"], {}, "invsort db upgrade"),
    ],
)
def test_bad_jobs_and_settings_are_refused_with_a_clear_message(args, env, message, tmp_path):
    result = invoke(*args, env={"INVSORT_DATABASE_URL": f"sqlite:///{tmp_path}/x.db", **env})
    assert message in refused(result)


def test_submit_refuses_a_non_model_file_before_queueing(sqlite_url, monkeypatch):
    from worker.tasks import sort_batch_task

    queued: list[tuple] = []
    monkeypatch.setattr(sort_batch_task, "apply_async", lambda *a, **kw: queued.append((a, kw)))
    result = invoke("submit", EXAMPLES, "--model", ROOT / "pyproject.toml", env={"INVSORT_DATABASE_URL": sqlite_url})
    assert "not an invsort model file" in refused(result)
    assert queued == []
    with session_scope(sqlite_url) as session:
        assert catalog.list_jobs(session=session, limit=5) == []  # no job row either


# ------------------------------------------------------------------------------------------------- --device


@pytest.mark.parametrize("command", [
    ["sort", EXAMPLES],
    ["evaluate", "bundled:fashion_mnist_cnn", EXAMPLES, "--out", "OUT"],
    ["train", EXAMPLES, "--out", "OUT"],
])
@pytest.mark.parametrize("device", ["cuda:x", "gpu", "cuda:-1"])
def test_every_device_option_refuses_the_same_bad_names(command, device, tmp_path):
    result = invoke(*[tmp_path / "out" if a == "OUT" else a for a in command], "--device", device)
    assert result.exit_code == 2 and "Traceback" not in result.stderr  # a usage error, before any work
    assert (f"Invalid value for '--device': device must be auto, cpu, cuda or cuda:N (N: a GPU index, 0 first), "
            f"got '{device}'") in result.stderr
    assert not (tmp_path / "out").exists()


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
    result = invoke(*args, env=env)
    expected = "Error: device cuda:0 asked for, but no CUDA GPU is available here; use auto or cpu"
    assert one_line_error(result) == expected


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_cuda_n_names_a_gpu_that_exists(tmp_path):
    from pipeline.inference.predictor import resolve_device

    count = torch.cuda.device_count()
    assert resolve_device(f"cuda:{count - 1}") == torch.device("cuda", count - 1)
    result = invoke("sort", EXAMPLES, "--device", f"cuda:{count}", "--db", f"sqlite:///{tmp_path}/c.db")
    assert f"this machine has {count} CUDA GPU(s)" in one_line_error(result)
    ok = invoke("sort", EXAMPLES, "--device", f"cuda:{count - 1}", "--db", f"sqlite:///{tmp_path}/c.db",
                "--no-progress")
    assert ok.exit_code == 0 and "sorted 50 images" in ok.stdout, ok.stderr


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
    assert one_line_error(invoke("model-info", mismatched_model)) == expected
    result = invoke("sort", EXAMPLES, "--model", mismatched_model, "--db", f"sqlite:///{tmp_path}/c.db",
                    "--no-progress")
    assert one_line_error(result) == expected


def test_weights_of_another_architecture_are_one_line(tmp_path):
    mf = load_model_file("bundled:fashion_mnist_cnn")
    path = tmp_path / "rgb.pt"
    save_model_file(dataclasses.replace(mf, in_chans=3, mean=(0.5,) * 3, std=(0.5,) * 3), path)
    line = one_line_error(invoke("model-info", path))
    assert line.startswith(f"Error: model file {path}: the weights do not fit invsort_cnn with 3 channel(s)")
    assert "features.0.0.weight is (32, 1, 3, 3), invsort_cnn needs (32, 3, 3, 3)" in line


def test_a_good_model_file_is_described():
    result = invoke("model-info", "bundled:fashion_mnist_cnn")
    assert result.exit_code == 0, result.stderr
    assert "classes (10): Ankle_boot, Bag, Coat" in result.stdout and "arch invsort_cnn" in result.stdout


# ----------------------------------------------------------------------------------------------- bad settings


def test_a_bad_setting_is_refused_before_any_work(tmp_path):
    result = invoke("sort", EXAMPLES, env={"INVSORT_MAX_IMAGE_PIXELS": "-1",
                                           "INVSORT_DATABASE_URL": f"sqlite:///{tmp_path}/c.db"})
    assert "INVSORT_MAX_IMAGE_PIXELS must be between 64 and 2147483648 pixels, got -1" in refused(result)
    assert not (tmp_path / "c.db").exists()


# ------------------------------------------------------------------------------------------ real processes


@pytest.mark.slow  # a fresh interpreter imports torch: ~3.5 s here
def test_a_refused_command_is_one_line_in_a_real_process(mismatched_model):
    """Nothing else reaches a user's terminal: no traceback, no warning of torch's, no log line."""
    expected = f"Error: model file {mismatched_model}: 3 class names but the classifier has 10 outputs"
    result = run_process("model-info", mismatched_model)
    assert one_line_error(result) == expected and result.stdout == ""


@pytest.mark.slow  # a fresh process imports torch and sorts 50 images, then another shows them: ~5 s
def test_the_readme_first_command_in_a_real_process(tmp_path):
    """``invsort sort examples/images`` in a clone, with no option and no setting; then the command it suggests."""
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    result = run_process("sort", "examples/images", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "sorted 50 images" in result.stdout and "0 failed" in result.stdout
    assert (tmp_path / "invsort.db").is_file()  # the default database: ./invsort.db
    look = result.stdout.split("look: ")[1].strip().split()
    assert look[:3] == ["invsort", "results", "--db"]
    shown = run_process(*look[1:], "--limit", 0, cwd=tmp_path)
    assert shown.returncode == 0, shown.stderr
    assert len(shown.stdout.splitlines()) == 50 and "examples/images/Ankle_boot/" in shown.stdout


# --------------------------------------------------------------------------- services that do not answer


def eventually(condition: Callable[[], bool], what: str, bound_s: float = 120.0) -> None:
    """Wait until ``condition()`` holds, checking every 0.1 s; fail after ``bound_s`` seconds (a bound, not a
    measurement)."""
    deadline = time.monotonic() + bound_s
    while not condition():
        assert time.monotonic() < deadline, f"not within {bound_s} s: {what}"
        time.sleep(0.1)


def set_job_status(url: str, job_id: str, status: str) -> None:
    """What a worker (done, failed) or a cancel would do to the job's row."""
    with session_scope(url) as session:
        session.execute(text("UPDATE sorting_jobs SET status = :s, finished_at = now(), error = :e WHERE id = :id"),
                        {"s": status, "e": "injected by the test" if status == "failed" else None, "id": job_id})


def test_an_unavailable_database_is_one_line_and_a_traceback_with_v():
    url = f"postgresql://postgres@127.0.0.1:{free_port()}/test"
    line = one_line_error(invoke("status", "--db", url))
    assert line.startswith("Error: database unavailable: connection failed:") and "Connection refused" in line
    assert line.endswith("(check INVSORT_DATABASE_URL or --db)")
    verbose = invoke("-v", "status", "--db", url)
    assert verbose.exit_code == 1 and "Traceback" in verbose.stderr and "OperationalError" in verbose.stderr
    assert verbose.stderr.strip().splitlines()[-1] == line


@pytest.mark.slow  # a fresh process imports torch: ~5-10 s here
def test_an_unavailable_broker_is_one_line_in_a_real_process(sqlite_url):
    result = run_process("submit", EXAMPLES, "--limit", 1, env={
        "INVSORT_DATABASE_URL": sqlite_url, "INVSORT_BROKER_URL": f"redis://127.0.0.1:{free_port()}/0"})
    line = one_line_error(result)
    assert line.startswith("Error: Redis broker unavailable: Error 111 connecting to 127.0.0.1:")
    with session_scope(sqlite_url) as session:
        (job,) = catalog.list_jobs(session=session, limit=5)
    assert job.status == "failed"  # the job row says so too


def test_submit_help_documents_the_exit_statuses():
    result = invoke("submit", "--help")
    assert result.exit_code == 0
    text_ = " ".join(result.stdout.split())
    assert "exit status 0 done, 1 failed, 3 cancelled" in text_ and "(2 is a usage error)" in text_


@pytest.mark.parametrize(("status", "code"), [("done", 0), ("failed", 1), ("cancelled", 3)])
def test_wait_ends_on_every_final_state_with_its_exit_status(status, code, pg_url, capsys):
    from worker.cli import WAIT_EXIT_CODES, _wait

    assert WAIT_EXIT_CODES[status] == code
    with session_scope(pg_url) as session:
        job_id = catalog.create_job(session=session, source="s3://b/p/", model_path="bundled:fashion_mnist_cnn",
                                    model_name="fashion_mnist_cnn", model_version="abc")
    set_job_status(pg_url, job_id, status)
    assert _wait(job_id, pg_url, total=0, poll_s=0.01) == code
    assert f"job {job_id} {status}: " in capsys.readouterr().out


@pytest.fixture
def broker_db() -> Iterator[str]:
    """A Redis database of this test's own (index 11) for the tasks 'submit' queues; no worker reads it."""
    import redis

    url = "redis://127.0.0.1:6379/11"
    client = redis.Redis.from_url(url)
    client.flushdb()
    yield url
    client.flushdb()


@pytest.mark.slow  # a fresh process imports torch, then waits out the outage: ~10-20 s here
def test_submit_wait_rides_out_a_database_outage(pg_url, broker_db):
    """The database goes away while 'submit --wait' waits (its connections are cut, new ones refused) and the job
    ends meanwhile: the waiter says so in one line, keeps asking, and exits 0 with the job's line once it is back."""
    u = make_url(pg_url)
    proxy = TcpProxy((u.host or "127.0.0.1", u.port or 5432))
    env = {**clean_env(), "INVSORT_DATABASE_URL": u.set(port=proxy.port).render_as_string(hide_password=False),
           "INVSORT_BROKER_URL": broker_db, "INVSORT_ITEMS_PER_TASK": "1", "PYTHONUNBUFFERED": "1"}
    script = Path(sys.executable).with_name("invsort")
    argv = [str(script)] if script.exists() else [sys.executable, "-m", "worker.cli"]
    proc = subprocess.Popen([*argv, "submit", str(EXAMPLES), "--limit", "2", "--wait"], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(proc.stdout or ()), daemon=True)
    reader.start()
    try:
        eventually(lambda: any(" tasks queued" in line for line in out) or proc.poll() is not None, "job queued")
        assert proc.poll() is None, (out, proc.stderr.read() if proc.stderr else "")
        job_id = out[0].split()[1].rstrip(":")
        proxy.cut()
        eventually(lambda: proxy.refused >= 3, "the waiter asked 3 times into the outage")
        assert proc.poll() is None  # it did not give up
        set_job_status(pg_url, job_id, "done")  # the job ends during the outage (straight to the server)
        proxy.restore()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
        proxy.close()
    reader.join(10)
    stderr = proc.stderr.read() if proc.stderr else ""
    assert proc.returncode == 0, stderr
    assert "Traceback" not in stderr
    outage_lines = [line for line in stderr.splitlines() if "database unavailable" in line]
    assert len(outage_lines) == 1 and "retrying until it answers" in outage_lines[0], stderr
    assert f"job {job_id} done: " in "".join(out)
