"""compile= (per-block torch.compile) with a peft LoRA: which adapter changes recompile, counted by a
compile backend that records every graph Dynamo hands it, and outputs that follow the new weights.

Measured (torch 2.13, peft 0.21): Dynamo specialises on peft's float scale, so each *new*
set_adapters weight compiles every block class once more, while a weight seen before reuses its
graphs; fuse_lora compiles once (the merged layers skip the LoRA branch), unfuse_lora reuses the
unfused graphs; disable_lora recompiles (enable_lora reuses), unload and loading another adapter
recompile. Past
torch._dynamo.config.recompile_limit entries per block class, Dynamo runs that block eagerly:
correct, uncompiled. The backend runs the captured graph as is, so outputs equal the uncompiled LoRA
pipeline's within ATOL."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

peft = pytest.importorskip("peft")

ATOL = 1e-6
GRAPHS: list[int] = []
BACKEND = "cachedit_test_count_graphs"


def _counting_backend():
    from torch._dynamo import list_backends, register_backend

    if BACKEND not in list_backends(exclude_tags=()):
        @register_backend(name=BACKEND)
        def count(gm, example_inputs):
            GRAPHS.append(len(gm.graph.nodes))
            return gm.forward


def _run(pipe):
    kwargs = tiny_call_kwargs("flux", num_inference_steps=2)
    kwargs.pop("negative_prompt"), kwargs.pop("true_cfg_scale")
    return pipe(prompt="a photo of a cat", **kwargs)[0]


def test_which_adapter_changes_recompile(lora_dir):
    _counting_backend()
    torch._dynamo.reset()
    pipe, reference = tiny_pipeline("flux"), tiny_pipeline("flux")
    for p in (pipe, reference):
        p.load_lora_weights(lora_dir, adapter_name="a")
    cachedit.accelerate(pipe, device="cpu_ref", cache=dict(residual_diff_threshold=0, warmup_steps=0),
                        compile=dict(backend=BACKEND))
    new_graphs = {}
    ops = [("first call", None), ("same call", None),
           ("set_adapters 0.5", lambda p: p.set_adapters(["a"], [0.5])),
           ("set_adapters 0.7", lambda p: p.set_adapters(["a"], [0.7])),
           ("set_adapters 0.5 again", lambda p: p.set_adapters(["a"], [0.5])),
           ("fuse_lora", lambda p: p.fuse_lora()), ("unfuse_lora", lambda p: p.unfuse_lora()),
           ("disable_lora", lambda p: p.disable_lora()), ("enable_lora", lambda p: p.enable_lora()),
           ("unload_lora_weights", lambda p: p.unload_lora_weights()),
           ("load another", lambda p: p.load_lora_weights(lora_dir, adapter_name="b"))]
    with torch._dynamo.config.patch(recompile_limit=64):  # count every recompilation, none falls back to eager
        for label, op in ops:
            if op is not None:
                op(pipe), op(reference)
            before = len(GRAPHS)
            got, want = _run(pipe), _run(reference)
            new_graphs[label] = len(GRAPHS) - before
            assert (got - want).abs().max().item() <= ATOL, label
    first = new_graphs["first call"]
    assert first > 0
    assert {k: new_graphs[k] for k in list(new_graphs)[:7]} == {
        "first call": first, "same call": 0, "set_adapters 0.5": first, "set_adapters 0.7": first,
        "set_adapters 0.5 again": 0, "fuse_lora": first, "unfuse_lora": 0}
    assert new_graphs["disable_lora"] > 0 and new_graphs["enable_lora"] == 0  # the enabled graphs are still cached
    assert new_graphs["unload_lora_weights"] > 0 and new_graphs["load another"] > 0
    cachedit.disable(pipe)
    torch._dynamo.reset()
