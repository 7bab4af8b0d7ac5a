"""One typed settings class for every part of invsort.

Values come from the environment (prefix ``INVSORT_``) and from a ``.env`` file in the working directory.
Nothing here is built at import time: call :func:`get_settings`, which caches one instance per process, and
``get_settings.cache_clear()`` in tests that change the environment.
"""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, ValidationError, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeline.errors import ConfigError

BUNDLED_MODEL = "bundled:fashion_mnist_cnn"
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="INVSORT_", env_file=".env", extra="ignore")

    database_url: str = Field(
        "sqlite:///./invsort.db",
        description="SQLAlchemy URL of the catalog database (sqlite:///FILE or postgresql+psycopg://...).",
    )
    broker_url: str = Field("redis://localhost:6379/0", description="Celery broker URL (Redis).")
    model_path: str = Field(
        BUNDLED_MODEL,
        description="Model file: a local path, an s3:// URI, or 'bundled:fashion_mnist_cnn'.",
    )
    batch_size: int = Field(64, description="Images per inference batch (1..4096).")
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where inference runs.")
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
        0, description="Threads that fetch and decode images; 0 picks min(8, CPU count)."
    )
    cpu_streams: int = Field(
        0,
        description="On the CPU, forward passes run side by side, each on a micro-batch with cores / streams "
        "threads; 0 picks one per core of the process (its torch thread count).",
    )
    cpu_microbatch: int = Field(
        16, description="Images per forward pass on the CPU (a batch is split into micro-batches), 1..4096."
    )
    local_roots: Annotated[list[Path], NoDecode] = Field(
        default_factory=list,
        description="Directories that local (file://) image URIs may be read from, separated by ':' or ','.",
    )
    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint (MinIO, moto, ...).")
    items_per_task: int = Field(
        256, description="Images in one Celery image-batch task submitted by 'invsort submit' (1..100000)."
    )
    task_time_limit_s: int = Field(600, description="Hard time limit of one image-batch task, seconds.")
    visibility_timeout_s: int = Field(
        3600,
        description="Seconds before Redis hands an unacknowledged task (its worker died) to another worker; "
        "keep it above the longest task (1..604800).",
    )
    fetch_timeout_s: float = Field(30.0, description="Timeout of one S3 read, seconds.")
    max_image_bytes: int = Field(50 * 1024 * 1024, description="Larger encoded images fail, bytes.")
    max_image_pixels: int = Field(
        100_000_000, description="Decoded images with more pixels fail (decompression bombs)."
    )
    review_threshold: float | None = Field(
        None,
        description="Confidence below which a row gets status needs_review (0..1). "
        "Unset: the model file's own threshold, or 0.",
    )

    @field_validator("batch_size")
    @classmethod
    def _batch_size(cls, v: int) -> int:
        if not 1 <= v <= 4096:
            raise ValueError(f"INVSORT_BATCH_SIZE must be between 1 and 4096, got {v}")
        return v

    @field_validator("items_per_task")
    @classmethod
    def _items_per_task(cls, v: int) -> int:
        if not 1 <= v <= 100_000:
            raise ValueError(f"INVSORT_ITEMS_PER_TASK must be between 1 and 100000, got {v}")
        return v

    @field_validator("visibility_timeout_s")
    @classmethod
    def _visibility(cls, v: int) -> int:
        if not 1 <= v <= 604_800:
            raise ValueError(f"INVSORT_VISIBILITY_TIMEOUT_S must be between 1 and 604800 seconds, got {v}")
        return v

    @field_validator("compile", mode="before")
    @classmethod
    def _compile(cls, v: object) -> object:
        if isinstance(v, str):
            word = v.strip().lower()
            if word not in _TRUE | _FALSE:
                raise ValueError(f"INVSORT_COMPILE must be true or false (or 1/0, yes/no, on/off), got {v!r}")
            return word in _TRUE
        return v

    @field_validator("decode_workers")
    @classmethod
    def _decode_workers(cls, v: int) -> int:
        if not 0 <= v <= 256:
            raise ValueError(f"INVSORT_DECODE_WORKERS must be between 0 (auto) and 256, got {v}")
        return v

    @field_validator("cpu_streams")
    @classmethod
    def _cpu_streams(cls, v: int) -> int:
        if not 0 <= v <= 256:
            raise ValueError(f"INVSORT_CPU_STREAMS must be between 0 (one per core) and 256, got {v}")
        return v

    @field_validator("cpu_microbatch")
    @classmethod
    def _cpu_microbatch(cls, v: int) -> int:
        if not 1 <= v <= 4096:
            raise ValueError(f"INVSORT_CPU_MICROBATCH must be between 1 and 4096, got {v}")
        return v

    @field_validator("review_threshold")
    @classmethod
    def _threshold(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v <= 1.0:
            raise ValueError(f"INVSORT_REVIEW_THRESHOLD must be between 0 and 1, got {v}")
        return v

    @field_validator("database_url")
    @classmethod
    def _database_url(cls, v: str) -> str:
        scheme = v.split(":", 1)[0].split("+", 1)[0]
        if scheme not in ("sqlite", "postgresql", "postgres"):
            raise ValueError(
                f"INVSORT_DATABASE_URL must start with sqlite:/// or postgresql+psycopg://, got {v.split('@')[-1]!r}"
            )
        if scheme == "postgres":
            v = "postgresql" + v[len("postgres") :]
        if v.startswith("postgresql://"):
            v = "postgresql+psycopg://" + v[len("postgresql://") :]
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


def build_settings(**overrides: object) -> Settings:
    """Settings from the environment, with ``overrides`` (command-line options) taking precedence.

    Raises:
        ConfigError: a setting has a wrong value; the message names the setting and what is valid.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        lines = []
        for err in exc.errors():
            name = "INVSORT_" + "_".join(str(p) for p in err["loc"]).upper()
            msg = err["msg"].removeprefix("Value error, ")
            if "input" in err and "literal" in err["type"]:
                msg += f" (got {err['input']!r})"
            lines.append(f"{name}: {msg}")
        raise ConfigError("invalid settings:\n  " + "\n  ".join(lines)) from None


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process's settings from the environment, read once (``get_settings.cache_clear()`` re-reads).

    Raises:
        ConfigError: see :func:`build_settings`.
    """
    return build_settings()
