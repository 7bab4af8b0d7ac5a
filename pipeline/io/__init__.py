"""I/O: where image bytes come from (local roots, S3), source listings and manifests, image decoding, and
the product cut-out / composite onto a real photograph (:mod:`pipeline.io.cutout`).

Imports only the kernel (``pipeline.errors``, ``pipeline.records``, ``pipeline.settings``).
"""
