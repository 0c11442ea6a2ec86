import numpy as np
import pytest

import lutkernels as lk


@pytest.fixture
def restore_kernel_state():
    """Tests that switch ISA or thread count put them back."""
    isa, threads = lk.get_isa(), lk.get_threads()
    yield
    lk.set_isa(isa)
    lk.set_threads(threads)


def random_layer(rng, M, K, P, G, offsets):
    planes = rng.integers(0, 2, (P, M, K), dtype=np.int8) * 2 - 1
    scales = rng.standard_normal((P, M, K // G)).astype(np.float32)
    offs = rng.standard_normal((M, K // G)).astype(np.float32) if offsets else None
    return planes, scales, offs
