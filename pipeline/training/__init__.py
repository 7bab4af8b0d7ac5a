"""Training: data checks and splits, augmentation presets, the training loop, and the ``invsort train`` recipe.

Imports every layer below it (kernel, ``io``, ``models``, ``inference``, ``evaluation``); nothing imports it but
the front doors (``worker/``) and ``pipeline.bench``.
"""
