"""Settings: every bad value is refused with the setting's name and what is valid; URLs are normalised in one place."""

from __future__ import annotations

import pytest

from db.session import dispose_engines, get_engine
from pipeline.errors import ConfigError
from pipeline.settings import Settings, build_settings, check_device, normalise_database_url, valid_range


def refused(**overrides: object) -> str:
    with pytest.raises(ConfigError) as err:
        build_settings(**overrides)
    return str(err.value)


@pytest.mark.parametrize(
    ("env", "value", "message"),
    [
        # the four from issue 10: the first two made every image fail, the last two broke every fetch / task
        ("INVSORT_MAX_IMAGE_PIXELS", "-1", "INVSORT_MAX_IMAGE_PIXELS must be between 64 and 2147483648 pixels, got -1"),
        ("INVSORT_MAX_IMAGE_BYTES", "0", "INVSORT_MAX_IMAGE_BYTES must be between 1 and 2147483648 bytes, got 0"),
        ("INVSORT_FETCH_TIMEOUT_S", "-1", "INVSORT_FETCH_TIMEOUT_S must be above 0 and at most 3600 seconds, got -1"),
        ("INVSORT_TASK_TIME_LIMIT_S", "0", "INVSORT_TASK_TIME_LIMIT_S must be between 1 and 86400 seconds, got 0"),
        ("INVSORT_BATCH_SIZE", "0", "INVSORT_BATCH_SIZE must be between 1 and 4096, got 0"),
        ("INVSORT_BATCH_SIZE", "4097", "INVSORT_BATCH_SIZE must be between 1 and 4096, got 4097"),
        ("INVSORT_CPU_MICROBATCH", "0", "INVSORT_CPU_MICROBATCH must be between 1 and 4096, got 0"),
        ("INVSORT_CPU_STREAMS", "-1", "INVSORT_CPU_STREAMS must be between 0 and 256, got -1"),
        ("INVSORT_DECODE_WORKERS", "257", "INVSORT_DECODE_WORKERS must be between 0 and 256, got 257"),
        ("INVSORT_ITEMS_PER_TASK", "0", "INVSORT_ITEMS_PER_TASK must be between 1 and 100000, got 0"),
        ("INVSORT_VISIBILITY_TIMEOUT_S", "0", "INVSORT_VISIBILITY_TIMEOUT_S must be between 1 and 604800 seconds"),
        ("INVSORT_REVIEW_THRESHOLD", "1.5", "INVSORT_REVIEW_THRESHOLD must be between 0 and 1, got 1.5"),
        ("INVSORT_BATCH_SIZE", "many", "INVSORT_BATCH_SIZE: Input should be a valid integer"),
        ("INVSORT_DEVICE", "tpu", "INVSORT_DEVICE must be auto, cpu, cuda or cuda:N (N: a GPU index, 0 first), got"),
        ("INVSORT_DEVICE", "cuda:x", "INVSORT_DEVICE must be auto, cpu, cuda or cuda:N"),
        ("INVSORT_GPU_DECODE", "gpu", "INVSORT_GPU_DECODE: Input should be 'auto', 'on' or 'off' (got 'gpu')"),
        ("INVSORT_COMPILE", "maybe", "INVSORT_COMPILE must be true or false (or 1/0, yes/no, on/off), got 'maybe'"),
        ("INVSORT_RUNTIME", "tensorrt", "INVSORT_RUNTIME: Input should be 'torch', 'onnxruntime' or 'openvino'"),
        ("INVSORT_BROKER_URL", "amqp://x", "INVSORT_BROKER_URL must be a redis:// or rediss:// URL"),
    ],
)
def test_a_bad_value_is_refused_with_its_name_and_the_valid_range(monkeypatch, env, value, message):
    monkeypatch.setenv(env, value)
    text = refused()
    assert message in text
    assert text.count("\n") == 1, "one line per bad setting, after the heading"


def test_a_password_in_a_bad_database_url_is_not_shown():
    text = refused(database_url="mysql://user:s3cret@db.example/catalog")
    assert "INVSORT_DATABASE_URL must start with sqlite:/// or postgresql+psycopg://" in text
    assert "s3cret" not in text


def test_every_bad_setting_is_listed_at_once():
    text = refused(batch_size=0, fetch_timeout_s=0, device="gpu")
    assert {line.split()[0] for line in text.splitlines()[1:]} == {
        "INVSORT_BATCH_SIZE", "INVSORT_FETCH_TIMEOUT_S", "INVSORT_DEVICE"
    }


def test_every_numeric_setting_has_a_range():
    numeric = [name for name, f in Settings.model_fields.items() if f.annotation in (int, float, float | None)]
    assert len(numeric) >= 20  # the filter finds them (21 when written); every one must have a range
    assert all(valid_range(name) for name in numeric), [name for name in numeric if not valid_range(name)]


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        ({"batch_size": 1, "cpu_streams": 0, "decode_workers": 256}, {"batch_size": 1, "decode_workers": 256}),
        ({"fetch_timeout_s": 0.5, "max_image_pixels": 64}, {"fetch_timeout_s": 0.5, "max_image_pixels": 64}),
        ({"review_threshold": 0}, {"review_threshold": 0.0}),
        ({"device": "cuda:1"}, {"device": "cuda:1"}),  # the spelling: whether GPU 1 exists is checked at use
    ],
)
def test_values_at_the_ends_of_the_ranges_are_accepted(overrides, expected):
    s = build_settings(**overrides)
    assert {k: getattr(s, k) for k in expected} == expected


def test_settings_read_the_environment(monkeypatch):
    monkeypatch.setenv("INVSORT_GPU_DECODE", "off")
    monkeypatch.setenv("INVSORT_COMPILE", "Yes")
    monkeypatch.setenv("INVSORT_MAX_IMAGE_BYTES", "1000")
    s = build_settings()
    assert (s.gpu_decode, s.compile, s.max_image_bytes) == ("off", True, 1000)
    assert build_settings(compile="0").compile is False


def test_command_line_overrides_win_over_the_environment(monkeypatch):
    monkeypatch.setenv("INVSORT_BATCH_SIZE", "0")  # refused alone, but the option replaces it
    assert build_settings(batch_size=32).batch_size == 32


@pytest.mark.parametrize("name", ["auto", "cpu", "cuda", "cuda:0", "cuda:12"])
def test_device_names(name):
    assert check_device(name) == name


@pytest.mark.parametrize("name", ["gpu", "cuda:", "cuda:x", "cuda:-1", "CUDA", " cpu", "cuda:0,1"])
def test_device_names_refused(name):
    with pytest.raises(ConfigError, match=r"^--device must be auto, cpu, cuda or cuda:N"):
        check_device(name, what="--device")


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("postgresql://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgres://u:p@h:5432/db", "postgresql+psycopg://u:p@h:5432/db"),
        ("postgres+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("postgresql+psycopg://u@h/db", "postgresql+psycopg://u@h/db"),
        ("sqlite:///./invsort.db", "sqlite:///./invsort.db"),
        ("sqlite://", "sqlite://"),
    ],
)
def test_database_urls_are_normalised_in_one_place(url, expected):
    assert normalise_database_url(url) == expected
    assert build_settings(database_url=url).database_url == expected


def test_the_engine_of_a_url_without_driver_is_the_psycopg_one(pg_url):
    """db.session normalises with the same function: both spellings get one engine, on psycopg 3."""
    plain = pg_url.replace("postgresql+psycopg://", "postgres://")
    try:
        assert get_engine(plain) is get_engine(pg_url)
        assert get_engine(plain).dialect.driver == "psycopg"
        with get_engine(plain).connect() as conn:
            assert conn.exec_driver_sql("SELECT 1").scalar() == 1
    finally:
        dispose_engines(plain)


def test_the_cgroup_cpu_limit_is_read_from_cgroup_v2_and_v1(tmp_path):
    from pipeline.settings import _cgroup_cpu_limit

    assert _cgroup_cpu_limit(tmp_path) is None  # no cgroup files: unlimited
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert _cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu.max").write_text("150000 100000\n")  # a container limited to 1.5 CPUs
    assert _cgroup_cpu_limit(tmp_path) == 1.5
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1\n")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert _cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("200000\n")
    assert _cgroup_cpu_limit(tmp_path) == 2.0


def test_usable_cpus_is_at_least_one_and_at_most_the_affinity():
    import os

    from pipeline.settings import usable_cpus

    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
