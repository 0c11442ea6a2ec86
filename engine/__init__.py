"""lutengine runtime: command line, model loading and generation on the LUT matmul core.

    from engine import load
    m = load("smollm2-135m-instruct")
    m.generate("Once upon a time", max_tokens=32)
"""
import os

# OpenBLAS's own threads spin after every numpy matmul (attention over a prompt)
# and then fight the LUT kernels' pool for the same cores: 2-thread prompt speed
# measured 95-110 tok/s with them against 303-341 without. Only takes effect if
# numpy is not imported yet, and only where the user has not chosen.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .load import load  # noqa: E402

__all__ = ["load"]
