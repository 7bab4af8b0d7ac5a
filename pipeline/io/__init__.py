"""I/O: where image bytes come from (local roots, S3), source listings and manifests, and image decoding.

Imports only the kernel (``pipeline.errors``, ``pipeline.records``, ``pipeline.settings``).
"""
