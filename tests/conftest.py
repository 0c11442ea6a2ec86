import os

import numpy as np
import pytest

import lutkernels as lk


@pytest.fixture(autouse=True, scope="session")
def converted_cache(tmp_path_factory):
    """Local models the tests load are converted into the session's own folder, not the user's cache
    (engine/load.py; subprocesses inherit it)."""
    os.environ["LUTENGINE_CONVERTED"] = str(tmp_path_factory.mktemp("converted"))


@pytest.fixture
def restore_kernel_state():
    """Tests that switch ISA, thread count or the integer GEMM's int8 variant put them back."""
    isa, threads = lk.get_isa(), lk.get_threads()
    yield
    lk.set_isa(isa)
    lk.set_threads(threads)
    lk.set_int8_gemm(True)


def random_layer(rng, M, K, P, G, offsets, scale8=False):
    """scale8: scales in what 8-bit scales can hold (non-negative, some 0) and offsets
    within [-16, 15.875] times plane 0's scale, as lutkernels.pack(scale8=True) needs."""
    planes = rng.integers(0, 2, (P, M, K), dtype=np.int8) * 2 - 1
    scales = rng.standard_normal((P, M, K // G)).astype(np.float32)
    offs = rng.standard_normal((M, K // G)).astype(np.float32) if offsets else None
    if scale8:
        scales = np.abs(scales) * np.float32(0.5)
        scales[scales < 0.01] = 0
        if offsets:
            offs = (scales[0] * rng.uniform(-15, 15, (M, K // G))).astype(np.float32)
    return planes, scales, offs
