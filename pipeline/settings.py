"""One typed settings class for every part of invsort.

Values come from the environment (prefix ``INVSORT_``) and from a ``.env`` file in the working directory.
Nothing here is built at import time: call :func:`get_settings`, which caches one instance per process, and
``get_settings.cache_clear()`` in tests that change the environment.
"""

from __future__ import annotations

import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeline.errors import ConfigError

BUNDLED_MODEL = "bundled:fashion_mnist_cnn"
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def normalise_database_url(url: str) -> str:
    """The database URL with the driver invsort uses: the one place URLs are normalised.

    ``postgres://`` and ``postgresql://`` (no driver named) become ``postgresql+psycopg://``: psycopg 3 is the
    installed driver, not SQLAlchemy's default psycopg2. ``postgres+DRIVER://`` becomes ``postgresql+DRIVER://``.
    Anything else (SQLite URLs, an explicit PostgreSQL driver) is returned unchanged; nothing is validated here.
    """
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    dialect, plus, driver = scheme.partition("+")
    if dialect == "postgres":
        dialect = "postgresql"
    if dialect == "postgresql" and not plus:
        driver, plus = "psycopg", "+"
    return f"{dialect}{plus}{driver}://{rest}"


def check_device(name: str, *, what: str = "INVSORT_DEVICE") -> str:
    """``name`` if it is a device name invsort knows: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (N >= 0).

    Only the spelling is checked here; whether the GPU exists is checked where it is used
    (:func:`pipeline.inference.predictor.resolve_device`).

    Raises:
        ConfigError: any other name; the message starts with ``what`` (the setting or option) and lists the valid
            ones.
    """
    if not _DEVICE.fullmatch(name):
        raise ConfigError(f"{what} must be auto, cpu, cuda or cuda:N (N: a GPU index, 0 first), got {name!r}")
    return name


_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class Settings(BaseSettings):
    """Every setting; numeric ranges are pydantic constraints, and :func:`build_settings` words their errors."""

    model_config = SettingsConfigDict(env_prefix="INVSORT_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite:///./invsort.db",
        description="SQLAlchemy URL of the catalog database (sqlite:///FILE or postgresql://...; postgresql:// "
        "and postgres:// mean postgresql+psycopg://).",
    )
    broker_url: str = Field("redis://localhost:6379/0", description="Celery broker URL (Redis).")
    model_path: str = Field(
        BUNDLED_MODEL,
        description="Model file: a local path, an s3:// URI, or 'bundled:fashion_mnist_cnn'.",
    )
    batch_size: int = Field(64, ge=1, le=4096, description="Images per inference batch.")
    device: str = Field("auto", description="Where inference runs: auto, cpu, cuda or cuda:N.")
    runtime: Literal["torch", "onnxruntime", "openvino"] = Field(
        "torch",
        description="What runs the network on the CPU: torch, or the model exported to ONNX and run by "
        "onnxruntime or openvino (needs the 'onnx' extra; device auto then means cpu, cuda is refused).",
    )
    runtime_cache_dir: Path | None = Field(
        None, description="Folder of the ONNX exports, one per model version [default: ~/.cache/invsort/onnx]."
    )
    gpu_decode: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Decode JPEGs on the GPU with nvJPEG, a batch at a time, and resize them there: auto (when "
        "inference runs on CUDA), on (CUDA only) or off (OpenCV in the decode threads).",
    )
    compile: bool = Field(
        False,
        description="Run the network through torch.compile (runtime torch; compiled once at start-up for the "
        "batch size, refused at start-up where it fails).",
    )
    decode_workers: int = Field(
        0, ge=0, le=256, description="Threads that fetch and decode images; 0 picks min(8, CPU count)."
    )
    cpu_streams: int = Field(
        0,
        ge=0,
        le=256,
        description="On the CPU, forward passes run side by side, each on a micro-batch with cores / streams "
        "threads; 0 picks one per core of the process (its torch thread count).",
    )
    cpu_microbatch: int = Field(
        16, ge=1, le=4096, description="Images per forward pass on the CPU (a batch is split into micro-batches)."
    )
    local_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories that local (file://) image URIs may be read from, separated by ':' or ','.",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, ...).")
    s3_retry_mode: Literal["standard", "adaptive"] = Field(
        "standard",
        description="botocore's retry mode for S3: standard (exponential backoff with jitter, a retry quota) or "
        "adaptive (standard plus client-side rate limiting when S3 throttles).",
    )
    s3_max_attempts: int = Field(
        10,
        ge=1,
        le=50,
        description="Attempts of one S3 request, the first included, while S3 answers 5xx or throttles or the "
        "connection times out or resets; then the job (embedded) or the task's batch (queued) stops with a "
        "transient error instead of failing items (1..50).",
    )
    s3_connect_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Timeout of one connection to S3, seconds (above 0, at most 300)."
    )
    s3_max_pool_connections: int = Field(
        32,
        ge=1,
        le=1024,
        description="Connections to S3 kept open per process; keep it at least the decode threads (1..1024).",
    )
    items_per_task: int = Field(
        256, ge=1, le=100_000, description="Images in one Celery image-batch task submitted by 'invsort submit'."
    )
    task_time_limit_s: int = Field(
        600, ge=1, le=86_400, description="Hard time limit of one image-batch task, seconds (at most a day)."
    )
    visibility_timeout_s: int = Field(
        3600,
        ge=1,
        le=604_800,
        description="Seconds before Redis hands an unacknowledged task (its worker died) to another worker; "
        "keep it above the longest task (at most a week).",
    )
    heartbeat_interval_s: int = Field(
        10, ge=1, le=300, description="Seconds between a running batch's heartbeats in the database (1..300); "
        "a batch with none for 3 intervals is presumed lost by the reconciler.",
    )
    reconcile_interval_s: int = Field(
        30, ge=1, le=3600, description="Seconds between the reconciler's passes in 'invsort worker' (1..3600).",
    )
    requeue_grace_s: int = Field(
        60, ge=1, le=86_400, description="Seconds a queued batch may be absent from the broker before the "
        "reconciler enqueues it again (1..86400).",
    )
    max_batch_attempts: int = Field(
        5, ge=1, le=100, description="Starts of a batch without progress before its remaining items become "
        "failed rows (1..100).",
    )
    max_requeues: int = Field(
        5, ge=0, le=100, description="Times the reconciler enqueues a lost batch again before its items become "
        "failed rows (0..100).",
    )
    poison_crashes: int = Field(
        2, ge=1, le=20, description="Times one item may take its worker process down (crash or hang) before it "
        "fails alone (1..20).",
    )
    fetch_timeout_s: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="Seconds an S3 read may wait for the next bytes before it is retried (above 0, at most an hour).",
    )
    max_image_bytes: int = Field(
        50 * 1024 * 1024,
        ge=1,
        le=2**31,
        description="Larger encoded images fail, bytes (at most 2 GiB).",
    )
    max_image_pixels: int = Field(
        100_000_000,
        ge=64,
        le=2**31,
        description="Images whose header declares more pixels fail before anything is decoded (decompression "
        "bombs); at least 8x8, at most 2**31.",
    )
    decode_memory_bytes: int = Field(
        1 << 30,  # pipeline.io.images.DEFAULT_DECODE_MEMORY_BYTES
        ge=1 << 20,
        le=1 << 40,
        description="Decoded pixels the decode threads may hold together, bytes (each image's need read from its "
        "header; one that needs more decodes alone); 1 MiB to 1 TiB.",
    )
    review_threshold: float | None = Field(
        None,
        ge=0,
        le=1,
        description="Confidence below which a row gets status needs_review (0..1). "
        "Unset: the model file's own threshold, or 0.",
    )

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        return check_device(v)

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v: object) -> object:
        if isinstance(v, str):
            word = v.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ValueError(f"INVSORT_COMPILE must be true or false (or 1/0, yes/no, on/off), got {v!r}")
            return word in _TRUE
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        v = normalise_database_url(v)
        if v.split(":", 1)[0].split("+", 1)[0] not in ("sqlite", "postgresql"):
            raise ValueError(
                f"INVSORT_DATABASE_URL must start with sqlite:/// or postgresql+psycopg://, got {v.split('@')[-1]!r}"
            )
        return v

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, v: str) -> str:
        if not v.startswith(("redis://", "rediss://", "redis+socket://")):
            raise ValueError(f"INVSORT_BROKER_URL must be a redis:// or rediss:// URL, got {v.split('@')[-1]!r}")
        return v

    @field_validator("local_roots", mode="before")
    @classmethod
    def _roots(cls, v: object) -> object:
        if isinstance(v, str):
            v = [p for p in v.replace(",", ":").split(":") if p.strip()]
        return v

    @field_validator("local_roots")
    @classmethod
    def _resolve_roots(cls, v: list[Path]) -> list[Path]:
        return [Path(os.path.realpath(p.expanduser())) for p in v]

    @property
    def decode_threads(self) -> int:
        """Threads for fetch+decode: the setting, or min(8, CPU count) when it is 0."""
        return self.decode_workers or min(8, os.cpu_count() or 1)


_UNITS = {"_s": " seconds", "_bytes": " bytes", "_pixels": " pixels"}


def valid_range(name: str) -> str:
    """The valid range of numeric setting ``name`` (a field of :class:`Settings`) in words, with its unit:
    e.g. ``between 1 and 4096`` or ``above 0 and at most 3600 seconds``. Empty for a field without bounds."""
    bounds: dict[str, object] = {}
    for m in Settings.model_fields[name].metadata:
        for kind in ("ge", "gt", "le", "lt"):
            if hasattr(m, kind):
                bounds[kind] = getattr(m, kind)
    if "ge" in bounds and "le" in bounds:
        text = f"between {bounds['ge']} and {bounds['le']}"
    else:
        words = {"ge": "at least", "gt": "above", "le": "at most", "lt": "below"}
        text = " and ".join(f"{words[kind]} {value}" for kind, value in bounds.items())
    unit = next((u for suffix, u in _UNITS.items() if name.endswith(suffix)), "")
    return text + unit if text else ""


_RANGE_ERRORS = ("greater_than", "greater_than_equal", "less_than", "less_than_equal")


def build_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with ``overrides`` (command-line options) taking precedence.

    Raises:
        ConfigError: a setting has a wrong value; the message names the setting and what is valid.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            field = "_".join(str(p) for p in err["loc"])
            name = "INVSORT_" + field.upper()
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] in _RANGE_ERRORS and field in Settings.model_fields:
                lines.append(f"{name} must be {valid_range(field)}, got {err['input']}")
                continue
            if err["type"] != "value_error" and "input" in err:  # our own messages say what they got
                msg += f" (got {err['input']!r})"
            lines.append(msg if msg.startswith(name) else f"{name}: {msg}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings from the environment, read once (``get_settings.cache_clear()`` re-reads).

    Raises:
        ConfigError: see :func:`build_settings`.
    """
    return build_settings()
