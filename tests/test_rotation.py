"""The MLP rotation (lutkernels/rotation.py): the C path against its numpy definition, and R orthogonal."""
import numpy as np
import pytest

from engine.quant.rotate import orthogonal
from lutkernels import rotation


def random_rotation(F: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    a, _ = rotation.split(F)
    return rng.choice(np.array([-1, 1], np.float32), F), orthogonal(a, rng).astype(np.float32)


@pytest.mark.parametrize("F, a, n", [(8, 1, 8), (12, 3, 4), (32, 1, 32), (96, 3, 32), (1536, 3, 512), (4864, 19, 256), (320, 5, 64)])
def test_c_rotation_matches_the_reference_and_is_orthogonal(F, a, n):
    assert rotation.split(F) == (a, n)
    signs, mix = random_rotation(F)
    x = np.random.default_rng(1).standard_normal((3, F)).astype(np.float32)
    want = rotation.reference(x.astype(np.float64), signs.astype(np.float64), mix.astype(np.float64))
    got = rotation.apply(x.copy(), signs, mix)
    assert np.abs(got - want).max() < 1e-5 * np.abs(want).max()
    R = rotation.reference(np.eye(F), signs.astype(np.float64), mix.astype(np.float64)).T  # columns R e_i
    assert np.abs(R @ R.T - np.eye(F)).max() < 1e-6  # float32 mix: orthogonal to its rounding
    assert np.allclose(R @ x[0], want[0])  # reference rows are R x
    assert np.count_nonzero(np.abs(R) > 1e-9) == F * F  # every output mixes every input


def test_rotation_checks_its_arrays():
    signs, mix = random_rotation(96)
    with pytest.raises(TypeError, match="float64"):
        rotation.apply(np.zeros((2, 96)), signs, mix)
    with pytest.raises(ValueError, match=r"mix must have shape \(3, 3\)"):
        rotation.apply(np.zeros((2, 96), np.float32), signs, np.eye(2, dtype=np.float32))
    with pytest.raises(ValueError, match=r"signs \[96\] and mix \[3, 3\]"):
        rotation.check(signs[:64], mix, 96)
    with pytest.raises(ValueError, match="all be"):
        rotation.check(signs * 2, mix, 96)
