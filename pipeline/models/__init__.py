"""Models: the architecture registry, the model file (weights + everything needed to run them), model cards,
and the inference runtimes (torch, ONNX Runtime, OpenVINO).

Imports the kernel and ``pipeline.io``.
"""
