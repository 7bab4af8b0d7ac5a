"""What every route of the HTTP API shares: settings, model, metrics, the job starter (one per app)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

import anyio
from fastapi import Depends, Request

from pipeline.settings import Settings
from worker.web.metrics import Metrics
from worker.web.runner import JobStarter


@dataclass
class WebContext:
    """The app's shared state (``app.state.invsort``).

    Attributes:
        settings: every setting, as for the CLI.
        model_spec: the model every request and job uses.
        metrics: the Prometheus metrics.
        jobs: starts jobs, queued or embedded.
        classify_limiter: how many classify requests decode and run the model at once (set when the app starts,
            in its event loop; None: anyio's default thread limit).
    """

    settings: Settings
    model_spec: str
    metrics: Metrics
    jobs: JobStarter
    classify_limiter: anyio.CapacityLimiter | None = None


def context(request: Request) -> WebContext:
    """The :class:`WebContext` of the request's app (a FastAPI dependency)."""
    ctx: WebContext = request.app.state.invsort
    return ctx


#: A route parameter ``ctx: Ctx`` receives the :class:`WebContext`.
Ctx = Annotated[WebContext, Depends(context)]
