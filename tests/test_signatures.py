"""Processor signatures looked up once (cachedit/signatures.py): diffusers' attention forwards stop computing
`inspect.signature` per call, their keyword filtering and outputs stay those of the plain pipeline, and
`disable` leaves the processors as they were."""

from __future__ import annotations

import inspect
import logging

import pytest
import torch

import cachedit
from cachedit.signatures import SignedCall, looks_up_signatures
from cachedit.testing.tiny import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline

PROMPT = "a photo of a cat"
NEVER_SKIP = dict(Fn=1, Bn=0, residual_diff_threshold=0, warmup_steps=0)


def _processors(model, looking_up: bool = True):
    """The processors of the attention modules that look their signature up per call (or of all)."""
    return [m.processor for m in model.modules() if getattr(m, "processor", None) is not None and m is not model
            and (looks_up_signatures(m) or not looking_up)]


def _signature_computations(pipe, **kwargs) -> int:
    """How often a pipeline call computes a signature from a function (what `inspect.signature` does when no
    `__signature__` answers it)."""
    calls = []
    original = inspect._signature_from_function

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    inspect._signature_from_function = counting
    try:
        pipe(prompt=PROMPT, **kwargs)
    finally:
        inspect._signature_from_function = original
    return len(calls)


@pytest.mark.parametrize("family", ["flux", "sd3", "flux2", "cogview4"])
def test_attention_calls_stop_computing_signatures_and_outputs_stay_bitwise(family):
    kwargs = lambda: tiny_call_kwargs(family, num_inference_steps=3)  # noqa: E731
    plain = tiny_pipeline(family)
    expected = plain(prompt=PROMPT, **kwargs())
    pipe = tiny_pipeline(family)
    before = _signature_computations(pipe, **kwargs())
    processors = _processors(pipe.transformer)
    states = [dict(vars(p)) for p in processors]
    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
    signed = cachedit.summary(pipe)["signatures"]["signed_processors"]["transformer"]
    assert signed == len({id(p) for p in processors}) > 0
    for p in processors:
        assert isinstance(vars(p)["__call__"], SignedCall)
        assert inspect.signature(p.__call__) == inspect.signature(type(p).__call__.__get__(p))
    after = _signature_computations(pipe, **kwargs())
    assert after <= before - 3 * signed, (before, after)  # at least one lookup per processor and step gone
    got = pipe(prompt=PROMPT, **kwargs())
    name = "images" if hasattr(got, "images") else "frames"
    assert torch.equal(getattr(got, name), getattr(expected, name))
    cachedit.disable(pipe)
    assert [dict(vars(p)) for p in processors] == states


def test_unexpected_attention_kwargs_are_filtered_and_warned_about_as_without_it(caplog):
    kwargs = lambda: dict(tiny_call_kwargs("flux", num_inference_steps=2),  # noqa: E731
                          joint_attention_kwargs={"not_a_processor_argument": 1.0})
    plain = tiny_pipeline("flux")
    with caplog.at_level(logging.WARNING):
        expected = plain(prompt=PROMPT, **kwargs()).images
    warned = [r.getMessage() for r in caplog.records if "not_a_processor_argument" in r.getMessage()]
    assert warned, "diffusers warns about the unexpected argument"
    caplog.clear()
    pipe = tiny_pipeline("flux")
    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
    with caplog.at_level(logging.WARNING):
        got = pipe(prompt=PROMPT, **kwargs()).images
    assert [r.getMessage() for r in caplog.records if "not_a_processor_argument" in r.getMessage()] == warned
    assert torch.equal(got, expected)


def test_a_processor_set_after_accelerate_runs_unsigned_and_disable_leaves_it_alone():
    pipe = tiny_pipeline("flux")
    expected = pipe(prompt=PROMPT, **tiny_call_kwargs("flux", num_inference_steps=2)).images
    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
    first = next(m for m in pipe.transformer.modules() if getattr(m, "processor", None) is not None)
    replacement = type(first.processor)()
    first.set_processor(replacement)
    assert "__call__" not in vars(replacement)
    assert torch.equal(pipe(prompt=PROMPT, **tiny_call_kwargs("flux", num_inference_steps=2)).images, expected)
    cachedit.disable(pipe)
    assert first.processor is replacement and "__call__" not in vars(replacement)
    assert all("__call__" not in vars(p) for p in _processors(pipe.transformer))


def test_a_shared_processor_is_signed_once_and_compile_signs_nothing():
    pipe = tiny_pipeline("flux")
    shared = type(_processors(pipe.transformer)[0])()
    pipe.transformer.set_attn_processor(shared)
    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
    assert cachedit.summary(pipe)["signatures"]["signed_processors"] == {"transformer": 1}
    cachedit.disable(pipe)
    assert "__call__" not in vars(shared)
    cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP, compile=dict(backend="eager"))
    assert "signatures" not in cachedit.applied(pipe) and "__call__" not in vars(shared)
    cachedit.disable(pipe)


def test_every_tiny_family_is_signed_where_its_attention_looks_signatures_up():
    looking_up = []
    for family in TINY_FAMILIES:
        pipe = tiny_pipeline(family)
        cachedit.accelerate(pipe, device="cpu_ref", cache=NEVER_SKIP)
        counts = cachedit.summary(pipe)["signatures"]["signed_processors"]
        assert counts.get("transformer", 0) == len({id(p) for p in _processors(pipe.transformer)}), family
        assert all("__call__" not in vars(p) for p in set(_processors(pipe.transformer, False))
                   - set(_processors(pipe.transformer))), family
        looking_up += [family] if counts.get("transformer") else []
        cachedit.disable(pipe)
        assert all("__call__" not in vars(p) for p in _processors(pipe.transformer, False)), family
    assert {"flux", "sd3"} <= set(looking_up)
