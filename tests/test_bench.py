"""invsort bench: the peers run at a tiny size so the benchmark never rots; figures are checked for sanity only."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import time
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from sqlalchemy import func, select, text

from db.models import CatalogItem
from db.session import session_scope
from pipeline.bench.peers import (
    PEER_COMMAND,
    PEERS,
    RayConfig,
    _figures,
    format_table,
    parse_ray_config,
    ray_candidates,
    run_bench,
)
from pipeline.bench.stages import stage_figures
from pipeline.errors import ConfigError, SourceError
from tests.images import EXAMPLES, FOOTWEAR_TAR, MOBILENET_WEIGHTS, photo_jpeg
from worker.cli import main

ROOT = Path(__file__).resolve().parents[1]
HAS_RAY = find_spec("ray") is not None
HAS_CUDA = torch.cuda.is_available()
# One small fixed layout (no tuning): the test checks that the Ray peer works, not which layout is fastest.
RAY_TEST_CONFIG = "actors=1,cpus=1,threads=1,decode=actor"
RAY_SKIPPED = {"status": "skipped", "reason": "ray is not installed: pip install -e '.[bench]'"}


def run_cli(args: list[str]):
    result = CliRunner().invoke(main, ["bench", *args])
    assert result.exit_code == 0, result.output
    return result


def check_report(report: dict, *, images: int, peers: set[str]) -> None:
    assert report["images"] == images and report["timing"]
    assert set(report["peers"]) == peers
    for name, r in report["peers"].items():
        if name == "ray" and not HAS_RAY:
            assert r == RAY_SKIPPED
            continue
        assert r["status"] == "ok", (name, r.get("reason"))
        assert r["images"] == images, name
        assert r["images_per_s"] > 0 and r["seconds"] > 0, name
        assert r["images_per_s"] == pytest.approx(images / r["seconds"], rel=0.01), name
        assert 0 < r["batch_ms_p50"] <= r["batch_ms_p95"], name
        assert r["peak_rss_mib"] > 50 and r["setup_s"] >= 0 and r["config"], name
        assert r["model"]["version"] == report["model"]["version"], name


def test_parse_ray_config_reads_keys_and_refuses_nonsense():
    assert parse_ray_config("actors=2, cpus=0.75,threads=1,decode=tasks", batch_size=32) == RayConfig(
        actors=2, cpus=0.75, threads=1, decode="tasks", batch_size=32
    )
    for bad, words in [("actor=2", "key among"), ("actors=two", "must be int"), ("decode=gpu", "'actor' or 'tasks'"),
                       ("cpus=0", "> 0"), ("actors=0", "actors >= 1")]:
        with pytest.raises(ConfigError, match=words):
            parse_ray_config(bad)


@pytest.mark.parametrize("cpus", [1, 2, 4, 16])
def test_ray_candidates_leave_room_for_a_read_task(cpus):
    """Actors that reserve every logical CPU starve the read tasks and Ray Data waits for ever."""
    candidates = ray_candidates(cpus, 64)
    assert len(candidates) == len(set(candidates)) >= 2
    for cfg in candidates:
        busy = cfg.actors * cfg.cpus + cfg.read_cpus + (cfg.decode_cpus if cfg.decode == "tasks" else 0)
        assert busy <= cpus + 1e-9, cfg
        assert cfg.batch_size == 64 and cfg.actors * cfg.threads <= cpus


def test_figures_count_from_the_first_image_to_the_last_result():
    f = _figures(30, 10.0, [10.1, 10.2, 10.6])
    assert f["seconds"] == pytest.approx(0.6) and f["images_per_s"] == pytest.approx(50.0)
    assert f["batches"] == 3 and f["batch_ms_p50"] == pytest.approx(100.0) and f["batch_ms_p95"] == pytest.approx(370)


def test_run_bench_refuses_unknown_peers_and_sources_that_are_not_folders(tmp_path):
    with pytest.raises(ConfigError, match="valid: model_only"):
        run_bench(str(EXAMPLES), model_spec="bundled:fashion_mnist_cnn", peers=["spark"])
    with pytest.raises(SourceError, match="local folder"):
        run_bench("s3://bucket/photos", model_spec="bundled:fashion_mnist_cnn", peers=["naive"])
    with pytest.raises(SourceError, match="no images"):
        run_bench(str(tmp_path), model_spec="bundled:fashion_mnist_cnn", peers=["naive"])


def test_table_shows_figures_ratios_and_why_a_peer_is_missing():
    ok = {"status": "ok", "images": 8, "images_per_s": 40.0, "batch_ms_p50": 5.0, "batch_ms_p95": 9.0,
          "peak_rss_mib": 700.0, "setup_s": 2.0, "config": {"batch_size": 4}}
    report = {
        "peers": {"model_only": {**ok, "images_per_s": 80.0}, "ray": {"status": "skipped", "reason": "no ray"},
                  "naive": {"status": "error", "reason": "Traceback ...\nValueError: broken"}, "invsort_sqlite": ok},
        "ratios": {"invsort_sqlite": {"over_model_only": 0.5, "over_naive": None, "over_ray": None}},
        "model": {"spec": "bundled:x", "arch": "cnn", "input_size": [28, 28]}, "batch_size": 4,
        "machine": {"cpu_count": 2},
    }
    table = format_table(report)
    assert "skipped: no ray" in table and "error: ValueError: broken" in table
    assert "model-only 0.50x, naive -, ray -" in table
    assert [line.split()[:3] for line in table.splitlines() if line.startswith("invsort_sqlite  ")] == [
        ["invsort_sqlite", "8", "40.0"]
    ]


@pytest.mark.slow
def test_bench_cli_on_the_examples_runs_every_peer(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli([str(EXAMPLES), "--model", "bundled:fashion_mnist_cnn", "--limit", "40", "--batch-size", "16",
                      "--json", str(out), "--ray-config", RAY_TEST_CONFIG])
    report = json.loads(out.read_text())
    check_report(report, images=40, peers={"model_only", "decode_only", "naive", "ray", "invsort_sqlite"})
    assert report["batch_size"] == 16 and report["model"]["input_size"] == [28, 28]
    assert report["peers"]["invsort_sqlite"]["rows_written"] == 40
    assert report["peers"]["naive"]["config"]["batch_size"] == 1
    if HAS_RAY:
        ray = report["peers"]["ray"]
        assert ray["config"]["actors"] == 1 and ray["processes"] > 1 and ray["peak_pss_mib"] > 0
        assert report["ray_tuning"] == []  # a given layout is not tuned
    ratios = report["ratios"]["invsort_sqlite"]
    assert ratios["over_model_only"] > 0 and ratios["over_naive"] > 0
    assert (ratios["over_ray"] is not None) == HAS_RAY
    for peer in ("model_only", "decode_only", "naive", "ray", "invsort_sqlite"):
        assert f"\n{peer} " in result.stdout
    assert set(PEERS) == {"model_only", "decode_only", "naive", "ray", "invsort"}


def test_bench_runs_invsort_once_per_gpu_decode_mode_on_the_device_it_names(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli([str(EXAMPLES), "--model", "bundled:fashion_mnist_cnn", "--limit", "20", "--batch-size", "8",
                      "--peer", "model_only", "--peer", "invsort", "--device", "cpu", "--gpu-decode", "off",
                      "--gpu-decode", "auto", "--json", str(out)])
    report = json.loads(out.read_text())
    check_report(report, images=20, peers={"model_only", "invsort_sqlite_gpu_decode_off",
                                           "invsort_sqlite_gpu_decode_auto"})
    assert report["device"] == "cpu" and report["peers"]["model_only"]["config"]["device"] == "cpu"
    for mode in ("off", "auto"):  # on the CPU, auto decodes with OpenCV too
        config = report["peers"][f"invsort_sqlite_gpu_decode_{mode}"]["config"]
        assert (config["device"], config["decoder"]) == ("cpu", "opencv")
    assert "device cpu" in result.stdout


@pytest.mark.skipif(HAS_CUDA, reason="checks the refusals on a machine without a GPU")
@pytest.mark.parametrize(("args", "message"), [
    (["--device", "cuda"], "device cuda asked for, but no CUDA GPU is available here; use auto or cpu"),
    (["--gpu-decode", "on"], "INVSORT_GPU_DECODE=on decodes JPEGs on a CUDA GPU, but inference runs on cpu"),
])
def test_bench_refuses_a_gpu_that_is_not_here(args, message):
    result = CliRunner().invoke(main, ["bench", str(EXAMPLES), "--model", "bundled:fashion_mnist_cnn", *args])
    assert result.exit_code == 1 and message in result.output


def test_stage_figures_time_each_stage_of_a_sort_alone():
    photos = [photo_jpeg(seed) for seed in range(24)]
    figures = stage_figures(photos, model="bundled:fashion_mnist_cnn", device="cpu", batch_size=8, repeats=2,
                            decode_threads=2)
    assert set(figures) == {"import_torch_s", "predictor_s", "forward_on_device", "model_from_host",
                            "opencv_decode_ms", "opencv_decode_threads"} | ({"nvjpeg_decode"} if HAS_CUDA else set())
    assert all(v > 0 for v in figures.values())
    with pytest.raises(ValueError, match="no photos"):
        stage_figures([], model="bundled:fashion_mnist_cnn")


@pytest.mark.slow
def test_bench_writes_postgresql_rows_in_a_scratch_schema_it_drops(pg_url, tmp_path):
    with session_scope(pg_url) as session:
        before = session.scalar(select(func.count()).select_from(CatalogItem))
    out = tmp_path / "bench.json"
    run_cli([str(EXAMPLES), "--model", "bundled:fashion_mnist_cnn", "--limit", "20", "--peer", "invsort",
             "--db-url", pg_url, "--json", str(out)])
    report = json.loads(out.read_text())
    check_report(report, images=20, peers={"invsort_sqlite", "invsort_postgresql"})
    assert "scratch schema invsort_bench_" in report["peers"]["invsort_postgresql"]["config"]["database"]
    assert report["peers"]["invsort_postgresql"]["rows_written"] == 20
    with session_scope(pg_url) as session:
        assert session.scalar(select(func.count()).select_from(CatalogItem)) == before
        left = session.scalars(text("SELECT nspname FROM pg_namespace WHERE nspname LIKE 'invsort_bench_%'")).all()
    assert left == []


@pytest.mark.slow
@pytest.mark.shared
@pytest.mark.skipif(not (FOOTWEAR_TAR.exists() and MOBILENET_WEIGHTS.exists()),
                    reason="../shared footwear photos or ImageNet weights not present (a user's clone)")
def test_bench_cli_on_footwear_photos_with_mobilenet(tmp_path):
    from pipeline.models.modelfile import ModelFile, save_model_file
    from pipeline.models.registry import IMAGENET_MEAN, IMAGENET_STD, create_model

    photos = tmp_path / "photos"
    with tarfile.open(FOOTWEAR_TAR) as tar:
        members = sorted((m for m in tar.getmembers() if m.isfile() and m.name.endswith(".jpg")),
                         key=lambda m: m.name)[:64]
        tar.extractall(photos, members=members, filter="data")
    net = create_model("mobilenet_v2", num_classes=3, weights=str(MOBILENET_WEIGHTS))
    model = tmp_path / "shoes.pt"
    save_model_file(ModelFile(arch="mobilenet_v2", class_names=["Boot", "Sandal", "Shoe"], in_chans=3,
                              input_size=(136, 102), mean=IMAGENET_MEAN, std=IMAGENET_STD,
                              state_dict=net.state_dict()), model)
    out = tmp_path / "bench.json"
    peers = ["model_only", "decode_only", "naive", "invsort"]  # Ray is covered on the examples, and slow here
    run_cli([str(photos), "--model", str(model), "--batch-size", "32", "--json", str(out),
             *(arg for p in peers for arg in ("--peer", p))])
    report = json.loads(out.read_text())
    check_report(report, images=64, peers={"model_only", "decode_only", "naive", "invsort_sqlite"})
    assert report["model"]["arch"] == "mobilenet_v2" and report["peers"]["decode_only"]["failed"] == 0


def test_without_ray_the_ray_peer_is_skipped_with_the_install_hint(monkeypatch):
    import pipeline.bench.peers

    monkeypatch.setattr(pipeline.bench.peers, "find_spec", lambda name: None if name == "ray" else find_spec(name))
    report = run_bench(str(EXAMPLES), model_spec="bundled:fashion_mnist_cnn", limit=4, peers=["ray"])
    assert report["peers"] == {"ray": RAY_SKIPPED}
    assert report["machine"]["ray"] is None and report["ratios"] == {}


def test_percentiles_are_numpy_s_linear_ones():
    import numpy as np

    gaps = [3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0]
    start, arrivals, t = 0.0, [], 0.0
    for g in gaps:
        t += g / 1000.0
        arrivals.append(t)
    f = _figures(80, start, arrivals)
    assert f["batch_ms_p50"] == pytest.approx(float(np.percentile(gaps, 50)), abs=0.01)
    assert f["batch_ms_p95"] == pytest.approx(float(np.percentile(gaps, 95)), abs=0.01)


@pytest.mark.slow  # a fresh process imports torch and loads the model: ~3.5 s
def test_a_peer_process_reads_its_spec_on_stdin_and_prints_one_result_line():
    """The process 'invsort bench run' starts for each peer: the hidden 'invsort bench peer'."""
    spec = {"peer": "model_only", "source": str(EXAMPLES), "model": "bundled:fashion_mnist_cnn", "images": 8,
            "batch_size": 4, "threads": 1}
    proc = subprocess.run(PEER_COMMAND, input=json.dumps(spec), capture_output=True, text=True, cwd=ROOT,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1].removeprefix("INVSORT_BENCH_RESULT "))
    assert result["status"] == "ok" and result["images"] == 8 and result["batches"] == 2
    assert result["peak_rss_mib"] > 50 and result["rss_method"] == "ru_maxrss of the peer process"

    broken = subprocess.run(PEER_COMMAND, input="{}", capture_output=True, text=True, cwd=ROOT, timeout=300,
                            check=False)
    assert broken.returncode != 0 and "KeyError: 'peer'" in broken.stderr


def test_tree_memory_counts_child_processes():
    from pipeline.bench.peers import _TreeMemory

    monitor = _TreeMemory(interval_s=0.05)
    child = subprocess.Popen([sys.executable, "-c", "import time; b = bytearray(64 << 20); time.sleep(1.5)"])
    try:
        monitor.start()
        time.sleep(1.0)
    finally:
        tree = monitor.stop()
        child.wait()
    assert tree["processes"] >= 2 and tree["peak_rss_mib"] > 64 and 0 < tree["peak_pss_mib"] <= tree["peak_rss_mib"]


def test_bench_source_and_bench_run_source_are_the_same_command(monkeypatch):
    """Both spellings reach run_bench with the same arguments (a real run of the short one, every peer in its
    own process: test_bench_cli_on_the_examples_runs_every_peer)."""
    import pipeline.bench.peers as peers

    class Recorded(Exception):
        pass

    calls: list[tuple[str, dict]] = []

    def recorded(source, *, on_event, **options):
        calls.append((source, options))
        raise Recorded

    monkeypatch.setattr(peers, "run_bench", recorded)
    args = [str(EXAMPLES), "--peer", "model_only", "--limit", "8", "--batch-size", "4", "--db-url", "sqlite://"]
    for spelling in ([], ["run"]):
        result = CliRunner().invoke(main, ["bench", *spelling, *args])
        assert isinstance(result.exception, Recorded), result.output
    assert len(calls) == 2 and calls[0] == calls[1]
    source, options = calls[0]
    assert source == str(EXAMPLES) and options["peers"] == ("model_only",) and options["db_urls"] == ("sqlite://",)
    assert (options["limit"], options["batch_size"]) == (8, 4)


def test_bench_help_lists_run_and_catalog_but_not_the_peer_process():
    result = CliRunner().invoke(main, ["bench", "--help"])
    assert result.exit_code == 0
    commands = result.output.split("Commands:")[1]
    assert "run" in commands and "catalog" in commands and "peer" not in commands.split()


@pytest.mark.slow  # starts `invsort serve` and an embedded peer process, each importing torch: ~30-50 s
def test_bench_api_on_the_examples_reports_latency_throughput_and_the_goals(tmp_path):
    out = tmp_path / "api.json"
    result = run_cli(["api", str(EXAMPLES), "--requests", "10", "--clients", "2", "--warmup", "2",
                      "--json", str(out)])
    report = json.loads(out.read_text())
    assert report["photos"] == 50 and report["requests"] == 10 and report["clients"] == 2 and report["timing"]
    assert report["model"]["input_size"] == [28, 28] and report["model"]["served"]["version"] == \
        report["model"]["version"]
    for phase in ("sequential", "concurrent"):
        r = report[phase]
        assert (r["ok"], r["errors"], r["failed_photos"]) == (10, 0, 0), phase
        assert r["images_per_s"] == pytest.approx(10 / r["seconds"], rel=0.01), phase
        lat = r["latency_ms"]
        assert 0 < lat["min"] <= lat["p50"] <= lat["p95"] <= lat["p99"] <= lat["max"], phase
        assert r["client_cpu_s"] >= 0 and r["batching"]["batches"] >= 1, phase
    assert report["sequential"]["batching"]["requests_per_batch"] == 1.0  # one request in flight: never merged
    assert report["concurrent"]["clients"] == 2
    server = report["server"]
    assert server["rss_mib_peak"] >= server["rss_mib_idle"] > 50 and server["exit_code"] == 0
    embedded = report["embedded"]
    assert embedded["status"] == "ok" and embedded["images"] == 50 and embedded["images_per_s"] > 0
    goals = report["goals"]
    assert goals["p95_ms"]["value"] == report["sequential"]["latency_ms"]["p95"]
    assert goals["ratio"]["value"] == pytest.approx(
        report["concurrent"]["images_per_s"] / embedded["images_per_s"], abs=1e-3)
    assert {goals["p95_ms"]["met"], goals["ratio"]["met"]} <= {True, False}
    for words in ("sequential (1 client)", "2 clients", "embedded pipeline", "ratio 2 clients / embedded",
                  "server RSS", "sequential p95 <= 150 ms: ", "2 clients >= 0.8x embedded images/s: "):
        assert words in result.stdout, words


def test_bench_api_latency_figures_and_request_bodies():
    from pipeline.bench.api import latency_figures, multipart_body

    figures = latency_figures([0.010, 0.020, 0.030, 0.040, 0.100])
    assert figures == {"p50": 30.0, "p95": 88.0, "p99": 97.6, "mean": 40.0, "min": 10.0, "max": 100.0}
    assert latency_figures([]) == dict.fromkeys(("p50", "p95", "p99", "mean", "min", "max"))
    body, content_type = multipart_body('a"b.jpg', b"\xff\xd8data")
    boundary = content_type.split("boundary=")[1]
    assert body.startswith(f"--{boundary}\r\n".encode()) and body.endswith(f"\r\n--{boundary}--\r\n".encode())
    assert b'name="file"; filename="a%22b.jpg"' in body and b"\r\n\r\n\xff\xd8data\r\n" in body
