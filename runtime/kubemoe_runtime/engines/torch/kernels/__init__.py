"""Hand-written CPU kernels for what torch does slowly at decode's few rows (see each module)."""
