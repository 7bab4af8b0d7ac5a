"""Inference on the CPU (pipeline/inference): the Predictor's micro-batches on stream threads, and the streaming
pipeline's batching, ordering and listing errors. The GPU path (torchvision decode, in-flight batches, CUDA,
torch.compile) is tests/test_gpu_path.py's."""

import numpy as np
import pytest
import torch

from pipeline.errors import ConfigError
from pipeline.inference.predictor import Predictor, PredictorOptions
from pipeline.inference.streaming import run_pipeline
from pipeline.io.images import decode_image
from pipeline.io.storage import make_reader
from pipeline.models.modelfile import load_model_file
from pipeline.records import Item
from pipeline.settings import build_settings
from tests.images import EXAMPLES, example_files


class ExplodingSource:
    """Yields ``good`` items, then raises as a broken listing would."""

    def __init__(self, items, fail_after):
        self.items, self.fail_after = items, fail_after

    def __iter__(self):
        for i, item in enumerate(self.items):
            if i == self.fail_after:
                raise OSError("listing broke midway")
            yield item


def test_source_that_raises_midway_keeps_the_rows_already_read():
    files = example_files()
    items = [Item(f.as_uri(), f.as_uri()) for f in files]
    predictor = Predictor(load_model_file("bundled:fashion_mnist_cnn"), PredictorOptions(device="cpu"))
    reader = make_reader(build_settings(local_roots=str(EXAMPLES)))
    got = []
    with pytest.raises(OSError, match="listing broke midway"):
        run_pipeline(ExplodingSource(items, 20), predictor=predictor, reader=reader, on_batch=got.extend,
                     batch_size=8, decode_threads=2, prefetch_batches=1)
    assert [r.item_id for r in got] == [it.item_id for it in items[:20]]
    assert all(r.status != "failed" for r in got)


def test_streaming_pipeline_gives_the_same_results_as_one_big_batch():
    files = example_files()
    items = [Item(f.as_uri(), f.as_uri()) for f in files]
    predictor = Predictor(load_model_file("bundled:fashion_mnist_cnn"), PredictorOptions(device="cpu"))
    reader = make_reader(build_settings(local_roots=str(EXAMPLES)))
    small, big = [], []
    run_pipeline(items, predictor=predictor, reader=reader, on_batch=small.extend, batch_size=3, decode_threads=3)
    run_pipeline(items, predictor=predictor, reader=reader, on_batch=big.extend, batch_size=64, decode_threads=1)
    assert [r.item_id for r in small] == [it.item_id for it in items]
    assert [r.category for r in small] == [r.category for r in big]
    assert all(abs(a.confidence - b.confidence) < 1e-4 for a, b in zip(small, big, strict=True))


def test_cpu_streams_split_a_batch_into_micro_batches_with_the_same_results():
    mf = load_model_file("bundled:fashion_mnist_cnn")
    batch = torch.from_numpy(np.stack([decode_image(p.read_bytes(), size=mf.input_size, in_chans=1)
                                       for p in example_files()[:37]]))
    whole = Predictor(mf, PredictorOptions(device="cpu", cpu_streams=1, cpu_microbatch=4096))
    split = Predictor(mf, PredictorOptions(device="cpu", cpu_streams=3, cpu_microbatch=5))  # 8 micro-batches, 3 threads
    assert (whole.cpu_streams, split.cpu_streams) == (1, 3)
    probs = split.predict_probs(batch)
    assert probs.shape == (37, 10)
    torch.testing.assert_close(probs, whole.predict_probs(batch), rtol=1e-5, atol=1e-6)  # same rows, same order
    # each stream thread runs torch with its share of the cores; the caller's setting is left alone
    threads = torch.get_num_threads()
    assert split._pool.submit(torch.get_num_threads).result() == max(1, threads // 3)
    assert torch.get_num_threads() == threads
    pool = split._pool
    split.close()  # the forward threads are shut down; the closed predictor still predicts, in this thread
    assert pool._shutdown and split._pool is None
    torch.testing.assert_close(split.predict_probs(batch), probs)
    split.close()
    with Predictor(mf, PredictorOptions(device="cpu", cpu_streams=2)) as scoped:
        pool = scoped._pool
        assert pool is not None and scoped.predict_probs(batch[:3]).shape == (3, 10)
    assert pool._shutdown
    with pytest.raises(ConfigError, match="cpu_microbatch 1..4096"):
        Predictor(mf, PredictorOptions(device="cpu", cpu_microbatch=0))


def test_rows_whose_probabilities_are_not_finite_fail_alone():
    from pipeline.inference.predictor import NON_FINITE

    mf = load_model_file("bundled:fashion_mnist_cnn")
    with Predictor(mf, PredictorOptions(device="cpu", cpu_streams=1)) as predictor:
        images = torch.from_numpy(np.stack([decode_image(f.read_bytes(), size=mf.input_size, in_chans=1)
                                            for f in example_files()[:3]]))
        probs = predictor.predict_scored(images).clone()
        probs[1, 4] = float("nan")
        rows = predictor.results([Item(str(i), f"u{i}") for i in range(3)], probs, "job")
    assert [r.status for r in rows][1] == "failed" and rows[1].error == NON_FINITE
    assert rows[1].category is None and rows[1].confidence is None and rows[1].model_version == mf.version
    assert all(r.status != "failed" and 0 <= r.confidence <= 1 for r in (rows[0], rows[2]))
