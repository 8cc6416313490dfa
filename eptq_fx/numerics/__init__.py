"""Quantization numerics: fake-quantizer modules, calibration, and the numba kernels with numpy twins."""
