"""peft LoRA under tensor parallelism (`parallel=dict(tensor=2)`, 2 gloo ranks, one spawn): each shard
holds its slice of A / B (column-split q/k/v: B's rows; row-split to_out.0 and the single blocks'
packed proj_out: A's columns), unfused and fused, with set_adapters weights, fuse / unfuse and unload
after accelerate; every output equals the single-process pipeline under the same LoRA operations.
A LoRA loaded after a tensor-parallel accelerate fails in peft (size mismatch) and leaves the model as it was.
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


def _make_lora(path, **lora):
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    src = tiny_pipeline("flux")
    with torch.random.fork_rng():
        torch.manual_seed(0)
        src.transformer.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False,
                                               **lora))
    FluxPipeline.save_lora_weights(path, transformer_lora_layers=get_peft_model_state_dict(src.transformer))
    return path


@pytest.fixture(scope="module")
def lora_dir(tmp_path_factory):
    return _make_lora(tmp_path_factory.mktemp("lora"))


def _run(pipe):
    return pipe(prompt="a photo of a cat", **tiny_call_kwargs("flux", num_inference_steps=2))[0]


def _op(pipe, op):
    {"set": lambda: pipe.set_adapters(["a"], [0.5]), "fuse": pipe.fuse_lora, "unfuse": pipe.unfuse_lora,
     "unload": pipe.unload_lora_weights}[op]()


def _sequence(pipe, path, fused_first: bool, accelerate=None):
    """Load (and fuse), accelerate, run, then each op and a run."""
    pipe.load_lora_weights(path, adapter_name="a")
    if fused_first:
        pipe.fuse_lora()
    if accelerate is not None:
        accelerate(pipe)
    outs = {"loaded": _run(pipe)}
    for label, op in OPS if not fused_first else [("unfuse_lora", "unfuse"), ("set_adapters 0.5", "set")]:
        _op(pipe, op)
        outs[label] = _run(pipe)
    return outs


def _rank(rank, world, path):
    import cachedit as cd
    from cachedit.testing.tiny import tiny_pipeline as tp

    out = {}
    for fused_first in (False, True):
        pipe = tp("flux")
        out[fused_first] = _sequence(pipe, path, fused_first,
                                     lambda p: cd.accelerate(p, device="cpu_ref", parallel=dict(tensor=2)))
        shard = pipe.transformer.transformer_blocks[0].attn.to_q  # unloaded by now: the sharded base linear
        out[f"{fused_first} shape"] = tuple(shard.weight.shape)
        cd.disable(pipe)
    # Loading after accelerate: peft shapes A / B for the shards and the load fails; the model stays as it was.
    pipe = tp("flux")
    cd.accelerate(pipe, device="cpu_ref", parallel=dict(tensor=2))
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    try:
        pipe.load_lora_weights(path, adapter_name="a")
        out["load after"] = None
    except Exception as exc:  # peft's own size-mismatch error
        out["load after"] = type(exc).__name__
    after = dict(pipe.transformer.named_parameters())
    out["unchanged"] = before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    out["plain"] = _run(pipe)
    return out


def test_lora_under_tensor_parallel_matches_one_process(lora_dir):
    from cachedit.testing.distributed import run_distributed

    expected = {}
    for fused_first in (False, True):
        expected[fused_first] = _sequence(tiny_pipeline("flux"), lora_dir, fused_first)
    assert not torch.equal(expected[False]["loaded"], expected[False]["set_adapters 0.5"]), "the weight must act"
    plain = _run(tiny_pipeline("flux"))
    ranks = run_distributed(_rank, 2, args=(str(lora_dir),))
    for r in ranks:
        for fused_first in (False, True):
            for label, want in expected[fused_first].items():
                got = r[fused_first][label]
                assert (got - want).abs().max().item() <= ATOL, (fused_first, label)
        assert r["load after"] == "RuntimeError" and r["unchanged"]
        assert (r["plain"] - plain).abs().max().item() <= ATOL
        full = tiny_pipeline("flux").transformer.transformer_blocks[0].attn.to_q.weight.shape
        assert r["False shape"] == (full[0] // 2, full[1])  # each rank held its half of q


def test_lora_that_cannot_be_sharded_is_refused_before_anything_changes(tmp_path):
    """DoRA normalises whole weight rows: refused by the model checks, which run before the process
    group check, so one process sees the error."""
    pipe = tiny_pipeline("flux")
    pipe.load_lora_weights(_make_lora(tmp_path, use_dora=True), adapter_name="d")
    before = {n: p.clone() for n, p in pipe.transformer.named_parameters()}
    with pytest.raises(ValueError, match=r"ParallelConfig.tensor=2: .*to_q has a DoRA adapter"):
        cachedit.accelerate(pipe, device="cpu_ref", parallel=dict(tensor=2))
    assert cachedit.summary(pipe) == {"accelerated": False}
    after = dict(pipe.transformer.named_parameters())
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
