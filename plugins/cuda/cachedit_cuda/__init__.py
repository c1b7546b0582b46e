"""cachedit backend for NVIDIA GPUs."""
