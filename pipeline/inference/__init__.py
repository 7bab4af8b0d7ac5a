"""Inference: the :class:`~pipeline.inference.predictor.Predictor` and the streaming decode -> batch -> forward
pipeline that turns items into :class:`~pipeline.records.ItemResult` rows.

Imports the kernel, ``pipeline.io`` and ``pipeline.models``.
"""
