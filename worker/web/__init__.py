"""The HTTP API (``invsort serve``): a FastAPI app over the same job-service functions the CLI calls.

:func:`worker.web.app.create_app` builds it; the routes live beside it (``classify.py``, ``jobs.py``, ``items.py``).
"""
