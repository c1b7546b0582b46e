"""Tests of the offline tiny pipelines of cachedit.testing.tiny."""

import diffusers
import huggingface_hub
import pytest
import torch

from cachedit.testing.tiny import TINY_FAMILIES, tiny_call_kwargs, tiny_pipeline

REQUIRED_FAMILIES = ("flux", "qwenimage", "wan", "sd3", "zimage")
PROMPT = "a photo of a cat"


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # The tiny models are far too small for intra-op parallelism: with 2 threads on a busy 2-core machine, OpenMP
    # spin-waiting makes this file ~10x slower.
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(num_threads)


def _run(pipe, family: str, seed: int = 0) -> torch.Tensor:
    # `prompt=` as a keyword: Flux2Pipeline's first positional parameter is `image`.
    return pipe(prompt=PROMPT, **tiny_call_kwargs(family, seed=seed))[0]


def _state_dicts(pipe) -> dict[str, dict[str, torch.Tensor]]:
    return {name: c.state_dict() for name, c in pipe.components.items() if isinstance(c, torch.nn.Module)}


def test_required_families_come_first():
    assert TINY_FAMILIES[: len(REQUIRED_FAMILIES)] == REQUIRED_FAMILIES
    assert len(set(TINY_FAMILIES)) == len(TINY_FAMILIES)


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_pipeline_runs_end_to_end(family):
    pipe = tiny_pipeline(family)
    assert isinstance(pipe, diffusers.DiffusionPipeline)
    kwargs = tiny_call_kwargs(family)
    out = _run(pipe, family)
    assert isinstance(out, torch.Tensor)
    if "num_frames" in kwargs:  # video: (batch, frames, channels, height, width)
        expected = (1, kwargs["num_frames"], 3, kwargs["height"], kwargs["width"])
    else:
        expected = (1, 3, kwargs["height"], kwargs["width"])
    assert tuple(out.shape) == expected
    assert torch.isfinite(out).all()
    assert out.std() > 0


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_deterministic(family):
    pipe = tiny_pipeline(family, seed=0)
    assert torch.equal(_run(pipe, family), _run(pipe, family))

    sd_a, sd_b = _state_dicts(pipe), _state_dicts(tiny_pipeline(family, seed=0))
    assert sd_a.keys() == sd_b.keys()
    for name in sd_a:
        assert sd_a[name].keys() == sd_b[name].keys(), name
        for key in sd_a[name]:
            assert torch.equal(sd_a[name][key], sd_b[name][key]), f"{name}.{key}"

    other = _state_dicts(tiny_pipeline(family, seed=1))["transformer"]
    assert any(not torch.equal(v, other[k]) for k, v in sd_a["transformer"].items())


# A reloaded model holds bitwise-equal weights, but its tensors may be laid out differently in memory, and on
# some CPUs (seen on AMD EPYC) the kernels then take another path: outputs ~1e-6 apart. Weights are compared
# bitwise, outputs within this tolerance (images in [0, 1]).
ROUND_TRIP_ATOL = 2e-5


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_save_load_round_trip(family, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    pipe = tiny_pipeline(family)
    expected = _run(pipe, family)
    pipe.save_pretrained(tmp_path)
    loaded = diffusers.DiffusionPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is type(pipe)
    saved, reloaded = _state_dicts(pipe), _state_dicts(loaded)
    assert saved.keys() == reloaded.keys()
    for name in saved:
        assert saved[name].keys() == reloaded[name].keys(), name
        for key in saved[name]:
            assert torch.equal(saved[name][key], reloaded[name][key]), f"{name}.{key}"
    torch.testing.assert_close(_run(loaded, family), expected, rtol=0, atol=ROUND_TRIP_ATOL)


def test_unknown_family():
    with pytest.raises(ValueError, match="nope") as info:
        tiny_pipeline("nope")
    for family in TINY_FAMILIES:
        assert family in str(info.value)
    with pytest.raises(ValueError, match="flux, qwenimage"):
        tiny_call_kwargs("nope")


def test_dtype():
    pipe = tiny_pipeline("wan", dtype=torch.bfloat16)
    assert pipe.text_encoder.dtype == torch.bfloat16
    # like from_pretrained(torch_dtype=...), Wan's `_keep_in_fp32_modules` stay in float32
    assert pipe.transformer.blocks[0].ffn.net[0].proj.weight.dtype == torch.bfloat16
    assert pipe.transformer.blocks[0].scale_shift_table.dtype == torch.float32
    out = _run(pipe, "wan")
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


def test_global_rng_untouched():
    state = torch.get_rng_state()
    tiny_pipeline("flux", seed=123)
    assert torch.equal(torch.get_rng_state(), state)


def test_call_kwargs():
    for family in TINY_FAMILIES:
        kwargs = tiny_call_kwargs(family, num_inference_steps=3, seed=5)
        assert kwargs["num_inference_steps"] == 3
        assert kwargs["output_type"] == "pt"
        assert torch.equal(kwargs["generator"].get_state(), torch.Generator("cpu").manual_seed(5).get_state())
        assert tiny_call_kwargs(family)["generator"] is not tiny_call_kwargs(family)["generator"]
    assert tiny_call_kwargs("qwenimage")["true_cfg_scale"] > 1
    assert tiny_call_kwargs("sd3")["guidance_scale"] > 1
    assert tiny_call_kwargs("wan")["num_frames"] == 5


def test_qwenimage_template_prefix_is_dropped_exactly():
    # QwenImagePipeline drops the first 34 tokens of its prompt template: the tiny tokenizer matches the real one.
    pipe = tiny_pipeline("qwenimage")
    prefix = pipe.prompt_template_encode.split("{}")[0]
    assert len(pipe.tokenizer(prefix).input_ids) == pipe.prompt_template_encode_start_idx == 34


def test_tokenizers_accept_any_text():
    pipe = tiny_pipeline("flux")
    text = "Ünïcode — 日本語 text, UPPER case & digits 123!"
    assert pipe.tokenizer.unk_token_id not in pipe.tokenizer(text).input_ids[1:-1]  # byte-level: no <unk>
    assert pipe.tokenizer_2.unk_token_id in pipe.tokenizer_2(text).input_ids  # T5: unknown characters -> <unk>
    pipe(prompt=text, **tiny_call_kwargs("flux", num_inference_steps=1))
