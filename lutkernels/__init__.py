"""LUT matmul core: the packed bit-plane format, its numpy reference, the trellis-coded format, and the C kernels."""
import numpy as np

from . import reference, trellis
from .kernels import (KernelError, Layer, TrellisLayer, cpu_features, gemm, gemv, get_isa, get_threads,
                      layer, set_igemm_rows, set_int8_gemm, set_isa, set_threads, supported_isas)
from .layout import GROUP_SIZES, LayoutError, PackedLinear, act_block, check_shape, pack, unpack
from .layout import dense as _plane_dense
from .trellis import TrellisLinear

QUANTIZED = (PackedLinear, TrellisLinear)  # the layer formats the kernels run


def dense(w) -> np.ndarray:
    """The float32 matrix a quantized layer (either format) stands for."""
    return trellis.dense(w) if isinstance(w, TrellisLinear) else _plane_dense(w)


__all__ = ["GROUP_SIZES", "KernelError", "Layer", "LayoutError", "PackedLinear", "QUANTIZED", "TrellisLayer",
           "TrellisLinear", "act_block", "check_shape", "cpu_features", "dense", "gemm", "gemv", "get_isa",
           "get_threads", "layer", "pack", "reference", "set_igemm_rows", "set_int8_gemm", "set_isa", "set_threads",
           "supported_isas", "trellis", "unpack"]
