"""One typed settings class for every part of invsort.

Values come from the environment (prefix ``INVSORT_``) and from a ``.env`` file in the working directory.
Nothing here is built at import time: call :func:`get_settings`, which caches one instance per process, and
``get_settings.cache_clear()`` in tests that change the environment.
"""

from __future__ import annotations

import base64
import binascii
import math
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from pipeline.errors import ConfigError

BUNDLED_MODEL = "bundled:fashion_mnist_cnn"
_TRUE, _FALSE = {"true", "1", "yes", "on"}, {"false", "0", "no", "off"}


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup")) -> float | None:
    """The CPU time this process's cgroup may use per second of wall time (a container's ``resources.limits.cpu``),
    from cgroup v2 ``cpu.max`` or cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``; None when unlimited or
    unreadable (not Linux, no cgroup file system)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "200000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:
        quota_us = int((root / "cpu" / "cpu.cfs_quota_us").read_text())  # cgroup v1; -1 = unlimited
        period_us = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None


@lru_cache(maxsize=1)
def usable_cpus() -> int:
    """The CPUs this process may use: the ones it may be scheduled on (:func:`os.sched_getaffinity`), capped by its
    cgroup's CPU limit rounded up (a container limited to 2 CPUs on a 32-CPU node gets 2, where
    :func:`os.cpu_count` says 32 and threads sized by it would be throttled). At least 1. Read once per process."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cpus = os.cpu_count() or 1
    limit = _cgroup_cpu_limit()
    if limit is not None:
        cpus = min(cpus, max(1, math.ceil(limit)))  # 1.5 CPUs of quota keep 2 threads busy part time
    return max(1, cpus)


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

_CRON_FIELDS = (("minute", 60, 0), ("hour", 24, 0), ("day of month", 31, 1), ("month", 12, 1),
                ("day of week", 7, 0))
CRON_FORM = (
    "a cron expression of 5 fields: minute (0-59), hour (0-23), day of month (1-31), month (1-12 or jan-dec), day "
    "of week (0-6 or sun-sat, 0 = Sunday), each *, a number, a list (1,15), a range (1-5) or a step (*/10), in UTC; "
    "e.g. '0 3 * * *' (03:00 every day) or '*/30 * * * 1-5' (every half hour on weekdays)"
)


def check_cron(expression: str, *, what: str = "INVSORT_RECATEGORIZE_SCHEDULE") -> str:
    """``expression`` with its fields single-spaced, if it is a 5-field cron expression Celery beat can run
    (:class:`celery.schedules.crontab`).

    Raises:
        ValueError: anything else; the message starts with ``what``, names the wrong field and the valid form.
    """
    from celery.schedules import crontab_parser  # only when a schedule is set: nothing else needs Celery here

    fields = expression.split()
    if len(fields) != len(_CRON_FIELDS):
        raise ValueError(f"{what} must be {CRON_FORM}; got {expression!r} ({len(fields)} fields)")
    for value, (name, size, first) in zip(fields, _CRON_FIELDS, strict=True):
        try:
            crontab_parser(size, first).parse(value)
        except Exception as exc:  # noqa: BLE001 - ValueError or the parser's own ParseException
            reason = "not a number" if "weekday literal" in str(exc) and name != "day of week" else str(exc)
            raise ValueError(f"{what} must be {CRON_FORM}; got {expression!r}, whose {name} field {value!r} is "
                             f"not valid ({reason.rstrip('.')})") from None
    return " ".join(fields)


MIN_API_TOKEN = 16  # characters of INVSORT_API_TOKEN, at least
_TOKEN = re.compile(r"[\x21-\x7e]+")  # visible ASCII: what an Authorization header carries unchanged


def check_api_token(token: str) -> str:
    """``token`` if it can be the web app's token (``INVSORT_API_TOKEN``): at least :data:`MIN_API_TOKEN` visible
    ASCII characters, no spaces (it travels in an ``Authorization: Bearer`` header).

    Raises:
        ValueError: any other token; the message says what is valid and never shows the token.
    """
    if len(token) < MIN_API_TOKEN or not _TOKEN.fullmatch(token):
        raise ValueError(
            f"INVSORT_API_TOKEN must be at least {MIN_API_TOKEN} visible ASCII characters without spaces, e.g. the "
            f"output of: python -c 'import secrets; print(secrets.token_urlsafe(32))' (got {len(token)} characters"
            + ("" if _TOKEN.fullmatch(token) else ", some of them spaces or not visible ASCII") + ")"
        )
    return token


MIN_WEBHOOK_KEY = 16  # bytes of the key that signs webhooks, at least
WEBHOOK_EVENTS = ("item.changed", "job.completed")  # db.models.WEBHOOK_EVENT_TYPES


def webhook_signing_key(secret: str) -> bytes:
    """The HMAC-SHA256 key of ``INVSORT_WEBHOOK_SECRET``, as the Standard Webhooks libraries derive it: a
    ``whsec_BASE64`` secret is the base64 of the key; any other secret is its own UTF-8 bytes.

    Raises:
        ValueError: the key is shorter than :data:`MIN_WEBHOOK_KEY` bytes, or a ``whsec_`` secret is not base64;
            the message never shows the secret.
    """
    if secret.startswith("whsec_"):
        try:
            key = base64.b64decode(secret.removeprefix("whsec_"), validate=True)
        except (binascii.Error, ValueError):
            raise ValueError("INVSORT_WEBHOOK_SECRET: a secret that starts with whsec_ must go on in base64 (the "
                             "Standard Webhooks form)") from None
    else:
        key = secret.encode("utf-8", "surrogatepass")
    if len(key) < MIN_WEBHOOK_KEY:
        raise ValueError(
            f"INVSORT_WEBHOOK_SECRET must be at least {MIN_WEBHOOK_KEY} bytes (a whsec_ secret: decoded), e.g. the "
            f"output of: python -c 'import secrets; print(secrets.token_urlsafe(32))' (got {len(key)})"
        )
    return key


def check_webhook_url(url: str) -> str:
    """``url`` if it can be ``INVSORT_WEBHOOK_URL``: ``http://`` or ``https://`` with a host.

    Raises:
        ValueError: any other URL; the message shows its scheme and host only (a URL may carry a token).
    """
    try:
        parts = urlsplit(url)
        scheme, host = parts.scheme, parts.hostname
        port_ok = parts.port is None or parts.port > 0
    except ValueError:  # a port that is no number, or out of range
        scheme, host, port_ok = url.partition(":")[0], None, False
    if scheme not in ("http", "https") or not host or not port_ok or any(c.isspace() for c in url):
        shown = f"{scheme}://{host or '...'}" if scheme.isalpha() else "a URL without a scheme"
        raise ValueError(f"INVSORT_WEBHOOK_URL must be an http:// or https:// URL with a host and a valid port, got "
                         f"{shown} (the rest not shown)")
    return url


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
    attribute_models: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Models of attributes other than the category (toe, material...) that run with every job, "
        "re-categorisation and scheduled run, separated by ',': local paths or s3:// URIs of model files made by "
        "invsort train --attribute NAME. A job that names a model of the same attribute (--model) uses its own.",
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
        0, ge=0, le=256, description="Threads that decode images, and read local ones (objects on S3 are fetched "
        "by INVSORT_FETCH_CONCURRENCY threads); 0 picks min(8, CPU count)."
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
        description="Connections to S3 kept open per process; the pool has at least INVSORT_FETCH_CONCURRENCY "
        "(1..1024).",
    )
    fetch_concurrency: int = Field(
        32,
        ge=1,
        le=1024,
        description="Objects a process fetches over the network (s3://) at once, each by a thread of its own, "
        "while at most the decode threads decode: enough GETs in flight to hide each one's latency (32 keeps "
        "mobilenet_v2 fed on 2 cores at 20 ms round trips; measured in the README, Performance). It also bounds "
        "the fetched bytes not yet decoded to this many images. Local files are read by the decode threads "
        "(1..1024).",
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
    history_retention_days: int | None = Field(
        None,
        ge=1,
        description="Days catalog_history keeps an entry (invsort db prune-history deletes older ones, but never an "
        "item's latest); unset (or empty): keep every entry.",
    )
    recategorize_schedule: str | None = Field(
        None,
        description="When 'invsort beat' has the workers re-sort every catalog row whose model version is not "
        "INVSORT_MODEL_PATH's: a cron expression of 5 fields (minute hour day-of-month month day-of-week, UTC), "
        "e.g. '0 3 * * *'; unset (or empty): never.",
    )
    api_token: SecretStr | None = Field(
        None,
        description="Token of the web app (invsort serve): when set, every request but /healthz needs "
        "'Authorization: Bearer TOKEN' or the session cookie of a browser that logged in with it; unset (or empty): "
        "no authentication, and serve listens on a loopback address only. At least "
        f"{MIN_API_TOKEN} visible ASCII characters, no spaces.",
    )
    log_format: Literal["text", "json"] = Field(
        "text",
        description="Log lines: text, or one JSON object a line (time, level, logger, message, and job_id and "
        "batch_no where a batch is being run).",
    )
    metrics_port: int = Field(
        9808,
        ge=0,
        le=65535,
        description="Port of the Prometheus metrics of 'invsort worker' (GET /metrics, every pool process "
        "counted); 0 turns them off (0..65535).",
    )
    metrics_addr: str = Field(
        "127.0.0.1",
        description="Address 'invsort worker' serves its metrics on: loopback by default; 0.0.0.0 (or the pod's "
        "address) where a Prometheus on another host or container scrapes it.",
    )
    metrics_dir: Path | None = Field(
        None,
        description="Folder where the worker's pool processes keep their metrics (prometheus-client's "
        "multiprocess files), emptied when the worker starts: one per worker. Unset: a new folder under "
        "$XDG_RUNTIME_DIR (or the temporary folder), removed when the worker stops.",
    )

    webhook_url: str | None = Field(
        None,
        description="Where webhooks are POSTed (http:// or https://): an event per change of an item's category or "
        "status and per job that ends, signed as Standard Webhooks sign them; unset (or empty): no webhooks.",
    )
    webhook_secret: SecretStr | None = Field(
        None,
        description="The key that signs webhooks (HMAC-SHA256): at least 16 bytes, or whsec_ and its base64 (the "
        "Standard Webhooks form). Required with INVSORT_WEBHOOK_URL.",
    )
    webhook_events: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: list(WEBHOOK_EVENTS),
        description="The webhook events to send, separated by ',': item.changed, job.completed [default: both].",
    )
    webhook_timeout_s: float = Field(
        10.0, gt=0, le=300, description="Seconds one webhook POST may take (connect, send, answer; above 0, at most "
        "300); longer counts as a failed attempt.",
    )
    webhook_backoff_s: float = Field(
        2.0, gt=0, le=3600, description="Seconds before a failed webhook is tried again the first time; each "
        "further failure doubles it, with jitter (above 0, at most 3600).",
    )
    webhook_max_backoff_s: float = Field(
        300.0, gt=0, le=86_400, description="The longest wait between two attempts of a webhook, seconds (above 0, "
        "at most a day): a receiver back after an outage gets everything within about this long.",
    )
    webhook_retention_days: int = Field(
        7, ge=1, le=3650, description="Days a delivered webhook is kept in webhook_outbox (1..3650); pending ones are "
        "never deleted.",
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

    @field_validator("metrics_addr", mode="before")
    @classmethod
    def _metrics_addr_empty(cls, v: object) -> object:
        if isinstance(v, str) and not v.strip():
            return "127.0.0.1"  # INVSORT_METRICS_ADDR= (empty) means the default, never every address
        return v.strip() if isinstance(v, str) else v

    @field_validator("metrics_dir", "history_retention_days", "api_token", "webhook_secret", mode="before")
    @classmethod
    def _empty_is_unset(cls, v: object) -> object:
        """An empty value (``INVSORT_API_TOKEN=`` in a .env) means the setting is unset."""
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("recategorize_schedule", mode="before")
    @classmethod
    def _schedule(cls, v: object) -> object:
        if isinstance(v, str):
            return check_cron(v) if v.strip() else None  # INVSORT_RECATEGORIZE_SCHEDULE= (empty) means unset
        return v

    @field_validator("api_token")
    @classmethod
    def _api_token(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            check_api_token(v.get_secret_value())
        return v

    @field_validator("webhook_url", mode="before")
    @classmethod
    def _webhook_url(cls, v: object) -> object:
        if isinstance(v, str):
            v = v.strip()
            return check_webhook_url(v) if v else None  # INVSORT_WEBHOOK_URL= (empty) means unset
        return v

    @field_validator("webhook_secret")
    @classmethod
    def _webhook_secret(cls, v: SecretStr | None) -> SecretStr | None:
        if v is not None:
            webhook_signing_key(v.get_secret_value())
        return v

    @field_validator("attribute_models", mode="before")
    @classmethod
    def _attribute_models(cls, v: object) -> object:
        if isinstance(v, str):
            v = [m.strip() for m in v.split(",") if m.strip()]
        if isinstance(v, list | tuple) and len(set(v)) != len(v):
            raise ValueError(f"INVSORT_ATTRIBUTE_MODELS names a model twice ({', '.join(map(str, v))}): name each "
                             "model file once, separated by ','")
        return v

    @field_validator("webhook_events", mode="before")
    @classmethod
    def _webhook_events(cls, v: object) -> object:
        if isinstance(v, str):
            v = [e.strip() for e in v.split(",") if e.strip()] or list(WEBHOOK_EVENTS)  # empty: the default
        if isinstance(v, list | tuple):
            unknown = [e for e in v if e not in WEBHOOK_EVENTS]
            if unknown:
                raise ValueError(f"INVSORT_WEBHOOK_EVENTS must be one or more of {', '.join(WEBHOOK_EVENTS)} "
                                 f"separated by ',', got {', '.join(map(repr, unknown))}")
        return v

    @model_validator(mode="after")
    def _webhook_secret_with_url(self) -> Settings:
        if self.webhook_url is not None and self.webhook_secret is None:
            raise ValueError("INVSORT_WEBHOOK_SECRET must be set when INVSORT_WEBHOOK_URL is: it signs every webhook")
        return self

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
        """Decode threads (they also read local files): the setting, or min(8, :func:`usable_cpus`) when it is 0."""
        return self.decode_workers or min(8, usable_cpus())


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
