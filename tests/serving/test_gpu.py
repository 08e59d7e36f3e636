"""The CUDA path: the batch's user tower and exact retrieval over the device-resident ad matrix on the GPU,
off the event loop, with the CPU path's picks. Skipped (with the reason) on a machine without CUDA."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from serving.pipeline import RequestPipeline
from tests.serving.test_batching import NOON, Recorder, assert_same, requests, selector, train_small_bundle, users

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the GPU path is not run")


def test_gpu_batch_equals_the_cpu_path(catalog_rows, trained_bundle) -> None:
    cpu = selector(catalog_rows, trained_bundle, control_share=0.1)
    gpu_bundle = _on_cuda(trained_bundle)
    gpu = selector(catalog_rows, gpu_bundle, control_share=0.1)
    assert gpu.state.device is not None and gpu.state.device_matrix.is_cuda and gpu.state.index is None
    feats, reqs = users(30), requests(30)
    items = [(r, (feats[r.user_id], None, 0.0)) for r in reqs]
    cpu._local.rng = np.random.default_rng(4)
    expected = cpu.select_many(items, now=NOON)
    gpu._local.rng = np.random.default_rng(4)
    got = gpu.select_many(items, now=NOON)
    assert_same(expected, got)


def test_gpu_batches_run_off_the_event_loop(catalog_rows, trained_bundle) -> None:
    sel = selector(catalog_rows, _on_cuda(trained_bundle))
    threads: list[str] = []
    select_many = sel.select_many
    sel.select_many = lambda items, **kw: (threads.append(threading.current_thread().name), select_many(items, **kw))[1]
    pipeline = RequestPipeline(sel, Recorder())

    async def main():
        return await asyncio.gather(*(pipeline.run(r) for r in requests(8)))

    results = asyncio.run(main())
    assert len(results) == 8 and threads and all(name.startswith("select-gpu") for name in threads)


@pytest.fixture(scope="module")
def trained_bundle():
    return train_small_bundle()


def _on_cuda(bundle):
    import copy

    moved = copy.copy(bundle)
    moved.tower = copy.deepcopy(bundle.tower).to("cuda")
    moved.device = torch.device("cuda")
    return moved
