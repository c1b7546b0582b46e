"""Quantized linear paths. The kernels come from backends; the core decides where they apply."""
