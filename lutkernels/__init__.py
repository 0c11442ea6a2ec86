"""LUT matmul core: the packed bit-plane format, its numpy reference, and the C kernels."""
from . import reference
from .layout import GROUP_SIZES, LayoutError, PackedLinear, act_block, check_shape, dense, pack, unpack
from .kernels import (KernelError, Layer, cpu_features, gemm, gemv, get_isa, get_threads, set_isa, set_threads,
                      supported_isas)

__all__ = ["GROUP_SIZES", "KernelError", "Layer", "LayoutError", "PackedLinear", "act_block", "check_shape",
           "cpu_features", "dense", "gemm", "gemv", "get_isa", "get_threads", "pack", "reference", "set_isa",
           "set_threads", "supported_isas", "unpack"]
