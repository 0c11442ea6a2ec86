"""lutengine runtime: command line, model loading and generation on the LUT matmul core."""
