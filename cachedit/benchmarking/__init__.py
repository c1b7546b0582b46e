"""Benchmarks of cachedit and its peers on one model, prompts and seeds.

`methods` is the catalogue (what is compared), `measure` times each method against the plain
pipeline interleaved (plain, accelerated, plain, ...) and counts FLOPs, `report` turns rows into
tables and headline ratios, `plot` draws the quality/speed frontier. `cachedit bench` and the
scripts under `bench/` are thin front ends.
"""

from .measure import Clock, run_bench
from .methods import Method, cache_dit_method, cachedit_method, default_methods, diffusers_method, model_and_call
from .report import frontier, headline, markdown, save_table, write

__all__ = ["Clock", "Method", "cache_dit_method", "cachedit_method", "default_methods", "diffusers_method",
           "frontier", "headline", "markdown", "model_and_call", "run_bench", "save_table", "write"]
