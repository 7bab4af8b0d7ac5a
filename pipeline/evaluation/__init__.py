"""Evaluation: metrics (top-1, precision/recall/F1, confusion matrix, ECE), calibration (temperature scaling,
the review threshold) and the ``invsort evaluate`` report.

Imports the kernel, ``pipeline.io``, ``pipeline.models`` and ``pipeline.inference``.
"""
