"""Test support shipped with cachedit: tiny offline pipelines, multi-process runs, the conformance suite."""
