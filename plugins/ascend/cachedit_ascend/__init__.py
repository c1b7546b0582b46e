"""cachedit backend for Huawei Ascend NPUs (through torch_npu)."""
