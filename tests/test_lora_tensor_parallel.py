"""peft LoRA under tensor parallelism (`parallel=dict(tensor=2)`, 2 gloo ranks, one spawn): each shard
holds its slice of A / B (column-split q/k/v: B's rows; row-split to_out.0 and the single blocks'
packed proj_out: A's columns), unfused and fused, with set_adapters weights, fuse / unfuse and unload
after accelerate; every output equals the single-process pipeline under the same LoRA operations.
A LoRA loaded after a tensor-parallel accelerate (alone, or next to one loaded before) is loaded into
the whole model and sharded (`parallel/tp_load.py`); one that cannot be sharded (DoRA) is refused
before anything changes, as is a direct `transformer.load_lora_adapter`.
Tolerance: ATOL = 1e-5 on the fp32 output images (row-split sums are added in another order)."""

from __future__ import annotations

import pytest
import torch

import cachedit
from cachedit.testing.tiny import tiny_call_kwargs, tiny_pipeline

peft = pytest.importorskip("peft")

ATOL = 1e-5
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]  # colwise, rowwise and packed rowwise in the FLUX plan
# The operations after accelerate, each followed by a call; the same ones run on the reference.
OPS = [("set_adapters 0.5", "set"), ("fuse_lora", "fuse"), ("unfuse_lora", "unfuse"), ("unload", "unload")]


@pytest.fixture(scope="module")
def lora_paths(tmp_path_factory, make_flux_lora):
    """Two LoRAs (seeds 0 and 1) on colwise, rowwise and packed rowwise linears, and a DoRA one."""
    return tuple(str(make_flux_lora(tmp_path_factory.mktemp(f"lora{i}"), TARGETS, seed=i, **lora))
                 for i, lora in enumerate([{}, {}, dict(use_dora=True)]))


def _run(pipe):
    return pipe(prompt="a photo of a cat", **tiny_call_kwargs("flux", num_inference_steps=2))[0]


def _op(pipe, op):
    {"set": lambda: pipe.set_adapters(["a"], [0.5]), "fuse": pipe.fuse_lora, "unfuse": pipe.unfuse_lora,
     "unload": pipe.unload_lora_weights, "both": lambda: pipe.set_adapters(["a", "b"], [0.5, 0.8])}[op]()


# When the LoRA is loaded, and the operations after accelerate (each followed by a call).
CASES = {
    "before": OPS,
    "before fused": [("unfuse_lora", "unfuse"), ("set_adapters 0.5", "set")],
    "after": OPS,
    "one before, one after": [("set_adapters a 0.5 b 0.8", "both"), ("fuse_lora", "fuse"), ("unload", "unload")],
}


def _sequence(pipe, paths, when: str, accelerate=lambda p: None):
    """Load (and fuse) per `when`, accelerate, run, then each op and a run."""
    path, other = paths
    if when != "after":
        pipe.load_lora_weights(path, adapter_name="a")
    if when == "before fused":
        pipe.fuse_lora()
    accelerate(pipe)
    if when == "after":
        pipe.load_lora_weights(path, adapter_name="a")
    if when == "one before, one after":
        pipe.load_lora_weights(other, adapter_name="b")
    outs = {"loaded": _run(pipe)}
    for label, op in CASES[when]:
        _op(pipe, op)
        outs[label] = _run(pipe)
    return outs


def _unchanged(before: dict, module) -> bool:
    after = dict(module.named_parameters())
    return before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)


def _rank(rank, world, paths, dora_path):
    import cachedit as cd
    from cachedit.testing.tiny import tiny_pipeline as tp

    out = {}
    for when in CASES:
        pipe = tp("flux")
        out[when] = _sequence(pipe, paths, when, lambda p: cd.accelerate(p, device="cpu_ref", parallel=dict(tensor=2)))
        shard = pipe.transformer.transformer_blocks[0].attn.to_q  # unloaded by now: the sharded base linear
        out[f"{when} shape"] = tuple(shard.weight.shape)
        cd.disable(pipe)
    # What cannot be sharded after accelerate is refused before anything changes.
    pipe = tp("flux")
    cd.accelerate(pipe, device="cpu_ref", parallel=dict(tensor=2))
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    refusals = []
    for load in (lambda: pipe.load_lora_weights(dora_path, adapter_name="d"),
                 lambda: pipe.transformer.load_lora_adapter(paths[0], prefix="transformer", adapter_name="t")):
        try:
            load()
            refusals.append(None)
        except ValueError as exc:
            refusals.append(str(exc))
    out["refusals"] = refusals
    out["unchanged"] = _unchanged(before, pipe.transformer) and not getattr(pipe.transformer, "peft_config", None)
    out["plain"] = _run(pipe)
    return out


# loading a second adapter beside the first is the point here; peft warns that a model gains a second adapter
@pytest.mark.filterwarnings("ignore:Already found a `peft_config` attribute:UserWarning")
def test_lora_under_tensor_parallel_matches_one_process(lora_paths):
    from cachedit.testing.distributed import run_distributed

    paths, dora = lora_paths[:2], lora_paths[2]
    expected = {when: _sequence(tiny_pipeline("flux"), paths, when) for when in CASES}
    assert not torch.equal(expected["before"]["loaded"], expected["before"]["set_adapters 0.5"]), "the weight acts"
    two = expected["one before, one after"]
    assert not torch.equal(two["loaded"], expected["before"]["loaded"]), "b acts, alone"
    assert not torch.equal(two["set_adapters a 0.5 b 0.8"], two["loaded"]), "then both"
    plain = _run(tiny_pipeline("flux"))
    ranks = run_distributed(_rank, 2, args=(paths, dora))
    full = tiny_pipeline("flux").transformer.transformer_blocks[0].attn.to_q.weight.shape
    for r in ranks:
        for when in CASES:
            for label, want in expected[when].items():
                got = r[when][label]
                assert (got - want).abs().max().item() <= ATOL, (when, label)
            assert r[f"{when} shape"] == (full[0] // 2, full[1])  # each rank held its half of q
        dora, direct = r["refusals"]
        assert dora is not None and "ParallelConfig.tensor=2" in dora and "has a DoRA adapter" in dora
        assert direct is not None and "pipe.load_lora_weights" in direct
        assert r["unchanged"]
        assert (r["plain"] - plain).abs().max().item() <= ATOL


def test_lora_that_cannot_be_sharded_is_refused_before_anything_changes(lora_paths):
    """DoRA normalises whole weight rows: refused by the model checks, which run before the process
    group check, so one process sees the error."""
    pipe = tiny_pipeline("flux")
    pipe.load_lora_weights(lora_paths[2], adapter_name="d")
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    with pytest.raises(ValueError, match=r"ParallelConfig.tensor=2: .*to_q has a DoRA adapter"):
        cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(tensor=2))
    assert cachedit.summary(pipe) == {"accelerated": False}
    after = dict(pipe.transformer.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
