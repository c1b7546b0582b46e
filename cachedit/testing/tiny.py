"""Tiny, offline diffusers pipelines for tests.

Every pipeline is a *real* diffusers pipeline class assembled from real diffusers / transformers model classes with
tiny configs and random weights: a 4-step call runs end to end on CPU in a fraction of a second and nothing is ever
downloaded. Tokenizers are built in memory: a BPE trained in a few milliseconds with the ``tokenizers`` library on a
small corpus (the pipelines' prompt templates plus a few words) or a small Unigram vocabulary, wrapped in the
matching transformers tokenizer class, so that ``save_pretrained`` / ``from_pretrained`` round-trips exactly. Any
prompt works: byte-level BPEs (CLIP, Qwen) and byte-fallback BPEs (Llama, Mistral, Gemma) cover every byte, the T5
vocabulary maps unknown characters to ``<unk>``.

Every transformer has >= 4 blocks, 4 attention heads of dim 16, and an image/video token count divisible by 4.

Families (``TINY_FAMILIES``, the five required ones first):

``flux``
    :class:`diffusers.FluxPipeline`: ``FluxTransformer2DModel`` (2 ``transformer_blocks`` + 2
    ``single_transformer_blocks``, guidance embedding as FLUX.1-dev), ``AutoencoderKL`` (4 latent channels, scale 2),
    ``CLIPTextModel`` + ``CLIPTokenizer``, ``T5EncoderModel`` + ``T5Tokenizer``, ``FlowMatchEulerDiscreteScheduler``.
    32x32 images -> 64 image tokens, 16 text tokens.
``qwenimage``
    :class:`diffusers.QwenImagePipeline`: ``QwenImageTransformer2DModel`` (4 blocks), ``AutoencoderKLQwenImage``
    (z_dim 4, scale 4), ``Qwen2_5_VLForConditionalGeneration`` (tiny text + vision towers) + ``Qwen2Tokenizer``, whose
    BPE splits the pipeline's prompt-template prefix into exactly the 34 tokens the pipeline drops, as the real one.
    32x32 images -> 16 image tokens; the text length follows the prompt (5 template tokens + the prompt's).
``wan``
    :class:`diffusers.WanPipeline` (Wan 2.1): ``WanTransformer3DModel`` (4 blocks), ``AutoencoderKLWan`` (z_dim 4,
    spatial scale 8, temporal scale 4), ``UMT5EncoderModel`` + ``T5Tokenizer``, ``UniPCMultistepScheduler`` (flow
    prediction, as the released checkpoints). 5 frames of 64x64 -> 2 latent frames -> 32 video tokens.
``sd3``
    :class:`diffusers.StableDiffusion3Pipeline`: ``SD3Transformer2DModel`` (4 joint blocks), two
    ``CLIPTextModelWithProjection`` + ``CLIPTokenizer`` (model_max_length 16), ``T5EncoderModel`` (d_model 64) +
    ``T5Tokenizer``, ``AutoencoderKL``, ``FlowMatchEulerDiscreteScheduler``. 32x32 -> 64 image tokens, 32 text tokens.
``zimage``
    :class:`diffusers.ZImagePipeline`: ``ZImageTransformer2DModel`` (4 layers + 1 noise and 1 context refiner layer),
    ``Qwen3Model`` + ``Qwen2Tokenizer`` with a Qwen chat template, ``AutoencoderKL``,
    ``FlowMatchEulerDiscreteScheduler``. 32x32 images -> 64 image tokens.

Extra families:

``flux2``
    :class:`diffusers.Flux2Pipeline`: ``Flux2Transformer2DModel`` (2 double + 2 single blocks), ``AutoencoderKLFlux2``,
    ``Mistral3ForConditionalGeneration`` (3 text layers, tiny Pixtral vision tower) + a Mistral-style
    ``LlamaTokenizer`` with a ``[SYSTEM_PROMPT]``/``[INST]`` chat template (used in place of the ``PixtralProcessor``;
    the pipeline only calls ``apply_chat_template``). Guidance-distilled: no CFG. 64 image tokens, 48 text tokens.
    Pass the prompt as a keyword, ``pipe(prompt=...)``: the first positional parameter of Flux2Pipeline is ``image``.
``wan22``
    :class:`diffusers.WanPipeline` (Wan 2.2 A14B): the ``wan`` components plus ``transformer_2`` and
    ``boundary_ratio=0.875`` (with 4 steps: 2 high-noise steps on ``transformer``, 2 on ``transformer_2``).
``hunyuanvideo``
    :class:`diffusers.HunyuanVideoPipeline`: ``HunyuanVideoTransformer3DModel`` (2 double + 2 single blocks, 1
    refiner block), ``AutoencoderKLHunyuanVideo``, ``LlamaModel`` + ``LlamaTokenizer`` (Llama-3 header tokens),
    ``CLIPTextModel`` + ``CLIPTokenizer``, ``FlowMatchEulerDiscreteScheduler``. 5 frames of 64x64 -> 32 video tokens.
``ltx``
    :class:`diffusers.LTXPipeline`: ``LTXVideoTransformer3DModel`` (4 blocks), ``AutoencoderKLLTXVideo`` (spatial and
    temporal scale 4), ``T5EncoderModel`` + ``T5Tokenizer``. 5 frames of 32x32 -> 128 video tokens.
``cogview4``
    :class:`diffusers.CogView4Pipeline`: ``CogView4Transformer2DModel`` (4 blocks), ``GlmModel`` + ``Qwen2Tokenizer``
    (stand-in for the GLM-4 byte-level BPE), ``AutoencoderKL``. 32x32 images -> 64 image tokens.
``lumina2``
    :class:`diffusers.Lumina2Pipeline`: ``Lumina2Transformer2DModel`` (4 layers + 1+1 refiner layers, 4 query and 4
    kv heads), ``Gemma2Model`` + ``GemmaTokenizer``, ``AutoencoderKL`` with scale 8 (the pipeline hard-codes 8).
    128x128 images -> 64 image tokens; 48 text tokens (the pipeline prepends a ~30-token system prompt).
``chroma``
    :class:`diffusers.ChromaPipeline`: ``ChromaTransformer2DModel`` (2 double + 2 single blocks),
    ``T5EncoderModel`` + ``T5Tokenizer``, ``AutoencoderKL``. 32x32 images -> 64 image tokens.

``tiny_call_kwargs(family)`` gives the keyword arguments (besides the prompt) for a fast deterministic call that runs
true classifier-free guidance wherever the pipeline supports it (all families but ``flux2``), so that both the
"cond" and "uncond" passes of the transformer run: as 2 transformer calls per step for flux, qwenimage, wan, wan22,
hunyuanvideo, cogview4, lumina2 and chroma; as 1 call on a batch of 2 for sd3, zimage and ltx.

The models are far too small for intra-op parallelism: call ``torch.set_num_threads(1)`` in tests (on a busy 2-core
machine, 2 OpenMP threads make a call ~10x slower).
"""

from __future__ import annotations

import functools
import json
import string
from dataclasses import dataclass
from typing import Any, Callable

import diffusers
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    Gemma2Config,
    Gemma2Model,
    GemmaTokenizer,
    GlmConfig,
    GlmModel,
    LlamaConfig,
    LlamaModel,
    LlamaTokenizer,
    Mistral3Config,
    Mistral3ForConditionalGeneration,
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2Tokenizer,
    Qwen3Config,
    Qwen3Model,
    T5Config,
    T5EncoderModel,
    T5Tokenizer,
    UMT5Config,
    UMT5EncoderModel,
)

from .._diffusers_compat import hunyuan_video_prompt_template, keep_in_fp32_modules

__all__ = ["TINY_FAMILIES", "tiny_call_kwargs", "tiny_pipeline"]

_TEXT_DIM = 32  # hidden size of the tiny text encoders
_HEADS = 4  # attention heads of every tiny transformer
_HEAD_DIM = 16
_ROPE_AXES = (4, 6, 6)  # 3-axis RoPE dims summing to _HEAD_DIM
_TEXT_LEN = 16  # max_sequence_length used by tiny_call_kwargs, CLIP model_max_length

# ----------------------------------------------------------------------------------------------------------------
# Tokenizers
# ----------------------------------------------------------------------------------------------------------------

# Words that get a token of their own (other words are split into smaller pieces).
_WORDS = (
    "a an the of with and in on at by to is photo picture painting image video cat dog monkey squirrel burger "
    "eating dance dancing red green blue white black big small bad quality blurry low worst ugly"
).split()

# Prompt templates / system prompts of the pipelines: the BPEs are trained on them so that they tokenize into
# (about) as many tokens as with the real tokenizers.
_CORPUS = (
    # QwenImage (QwenImagePipeline.prompt_template_encode)
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, spatial "
    "relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n<|im_start|>assistant\n",
    # HunyuanVideo (pipeline_hunyuan_video.DEFAULT_PROMPT_TEMPLATE)
    "<|start_header_id|>system<|end_header_id|>\n\nDescribe the video by detailing the following aspects: "
    "1. The main content and theme of the video.2. The color, shape, size, texture, quantity, text, and spatial "
    "relationships of the objects.3. Actions, events, behaviors temporal relationships, physical movement changes of "
    "the objects.4. background environment, light, style and atmosphere.5. camera angles, movements, and transitions "
    "used in the video:<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>",
    # Lumina2 system prompt
    "You are an assistant designed to generate superior images with the superior degree of image-text alignment "
    "based on textual prompts or user prompts. <Prompt Start> {}",
    # Flux2 system message
    "You are an AI that reasons about image descriptions. You give structured responses focusing on object "
    "relationships, object\nattribution and actions without speculation.",
    "user assistant system {}",
)

_QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
    "<think>",
    "</think>",
)
# Qwen chat template (ZImagePipeline applies it); contents may be strings or [{"type": "text", "text": ...}].
_QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'text' %}{{ part['text'] }}{% endif %}{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
_LLAMA_SPECIAL_TOKENS = ("<unk>", "<s>", "</s>", "<pad>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
_MISTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "<pad>", "[INST]", "[/INST]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[IMG]",
)  # fmt: skip
# Mistral Small 3 chat template (Flux2Pipeline applies it); contents are [{"type": "text", "text": ...}] lists.
_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['content'] is string %}{% set text = message['content'] %}{% else %}{% set text = namespace(v='') %}"
    "{% for part in message['content'] %}{% if part['type'] == 'text' %}{% set text.v = text.v + part['text'] %}"
    "{% endif %}{% endfor %}{% set text = text.v %}{% endif %}"
    "{% if message['role'] == 'system' %}[SYSTEM_PROMPT]{{ text }}[/SYSTEM_PROMPT]"
    "{% elif message['role'] == 'user' %}[INST]{{ text }}[/INST]{% else %}{{ text }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
_GEMMA_SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>")


def _corpus() -> list[str]:
    words = " ".join(_WORDS)
    return [text.replace("{}", words) for text in _CORPUS]


def _vocab_and_merges(backend: Tokenizer) -> tuple[dict[str, int], list[tuple[str, str]]]:
    model = json.loads(backend.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def _whole_word_bpe(backend: Tokenizer, special_tokens, alphabet, end_of_word_suffix: str = ""):
    """(vocab, merges) of BPE trained to completion on the corpus words: every corpus word ends up
    one token, as the real tokenizers do for their common words.

    A plain BPE training loop with ties broken by the pair itself: `tokenizers`' BpeTrainer breaks
    ties differently from one process to the next, which would make the tiny pipelines' text
    embeddings, and so their outputs, differ between processes.
    """
    counts: dict[tuple[str, ...], int] = {}
    for text in _corpus():
        if backend.normalizer is not None:
            text = backend.normalizer.normalize_str(text)
        for word, _ in backend.pre_tokenizer.pre_tokenize_str(text):
            symbols = list(word)
            if end_of_word_suffix:
                symbols[-1] += end_of_word_suffix
            counts[tuple(symbols)] = counts.get(tuple(symbols), 0) + 1
    vocab = {tok: i for i, tok in enumerate(special_tokens)}
    for char in sorted(alphabet):
        vocab.setdefault(char, len(vocab))
        if end_of_word_suffix:
            vocab.setdefault(char + end_of_word_suffix, len(vocab))
    merges = []
    while True:
        pairs: dict[tuple[str, str], int] = {}
        for word, n in counts.items():
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + n
        if not pairs:
            return vocab, merges
        best = min(pairs, key=lambda pair: (-pairs[pair], pair))
        merges.append(best)
        vocab.setdefault(best[0] + best[1], len(vocab))
        merged = {}
        for word, n in counts.items():
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged[tuple(out)] = merged.get(tuple(out), 0) + n
        counts = merged


@functools.lru_cache(maxsize=None)
def _byte_level_bpe(tokenizer_cls: type, special_tokens: tuple[str, ...], end_of_word_suffix: str = ""):
    """Byte-level BPE (CLIP, Qwen) over the corpus words, with the normalizer / pre-tokenizer of
    ``tokenizer_cls``. Every byte is a token (also word-final for CLIP), so no text maps to <unk>."""
    backend = tokenizer_cls().backend_tokenizer
    vocab, merges = _whole_word_bpe(backend, special_tokens, pre_tokenizers.ByteLevel.alphabet(), end_of_word_suffix)
    return json.dumps(vocab), tuple(merges)


@functools.lru_cache(maxsize=None)
def _sentencepiece_bpe(special_tokens: tuple[str, ...]):
    """SentencePiece-style BPE (Llama, Mistral, Gemma: "▁" for spaces, byte fallback) over the corpus words.

    Merges never cross word boundaries. ``<0x00>``..``<0xFF>`` byte tokens make every text encodable.
    """
    backend = Tokenizer(models.BPE(unk_token=special_tokens[0]))
    backend.normalizer = normalizers.Replace(" ", "\u2581")
    backend.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split("\u2581", "merged_with_next"),
            pre_tokenizers.Split("\n", "isolated"),
            pre_tokenizers.Punctuation(),
        ]
    )
    alphabet = list(string.ascii_letters + string.digits + string.punctuation + "\u2581\n")
    vocab, merges = _whole_word_bpe(backend, special_tokens, alphabet)
    for byte in range(256):
        vocab.setdefault(f"<0x{byte:02X}>", len(vocab))
    return json.dumps(vocab), tuple(merges)


def _clip_tokenizer() -> CLIPTokenizer:
    """Byte-level BPE CLIP tokenizer (lower-cased, words end in ``</w>``), model_max_length 16."""
    vocab, merges = _byte_level_bpe(CLIPTokenizer, ("<|startoftext|>", "<|endoftext|>"), "</w>")
    return CLIPTokenizer(vocab=json.loads(vocab), merges=list(merges), model_max_length=_TEXT_LEN)


def _qwen_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE Qwen tokenizer with the Qwen chat special tokens and a Qwen chat template."""
    vocab, merges = _byte_level_bpe(Qwen2Tokenizer, _QWEN_SPECIAL_TOKENS)
    return Qwen2Tokenizer(
        vocab=json.loads(vocab),
        merges=list(merges),
        extra_special_tokens=list(_QWEN_SPECIAL_TOKENS[1:]),
        model_max_length=2048,
        chat_template=_QWEN_CHAT_TEMPLATE,
    )


def _llama_tokenizer(
    special_tokens: tuple[str, ...] = _LLAMA_SPECIAL_TOKENS, *, padding_side: str = "right", **kwargs
) -> LlamaTokenizer:
    """Byte-fallback BPE Llama tokenizer: <unk>=0, <s>=1, </s>=2, <pad>=3, then ``special_tokens[4:]``; adds <s>."""
    vocab, merges = _sentencepiece_bpe(special_tokens)
    return LlamaTokenizer(
        vocab=json.loads(vocab),
        merges=list(merges),
        pad_token="<pad>",
        extra_special_tokens=list(special_tokens[4:]),
        add_bos_token=True,
        padding_side=padding_side,
        model_max_length=2048,
        **kwargs,
    )


def _gemma_tokenizer() -> GemmaTokenizer:
    """Byte-fallback BPE Gemma tokenizer: <pad>=0, <eos>=1, <bos>=2, <unk>=3, <mask>=4."""
    vocab, merges = _sentencepiece_bpe(_GEMMA_SPECIAL_TOKENS)
    return GemmaTokenizer(vocab=json.loads(vocab), merges=list(merges), add_bos_token=True, model_max_length=2048)


def _t5_tokenizer() -> T5Tokenizer:
    """Unigram T5 tokenizer: <pad>=0, </s>=1, <unk>=2, ASCII characters and ``_WORDS``; other characters -> <unk>."""
    chars = string.ascii_letters + string.digits + string.punctuation
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    pieces += [(c, -2.0) for c in chars] + [("\u2581" + c, -2.0) for c in chars]
    pieces += [("\u2581" + w, -1.0) for w in _WORDS if len(w) > 1]
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=512)


# ----------------------------------------------------------------------------------------------------------------
# Text encoders (random weights, 2 layers unless a pipeline needs more, vocab_size = len(tokenizer))
# ----------------------------------------------------------------------------------------------------------------


def _decoder_kwargs(tokenizer, *, num_hidden_layers: int = 2, **overrides) -> dict:
    """Config kwargs of a tiny decoder-only LM (Llama, Qwen3, Glm, Gemma2, Qwen2.5-VL / Mistral text models)."""
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=_TEXT_DIM // 4,
        max_position_embeddings=2048,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **overrides,
    )


def _clip_text_encoder(tokenizer: CLIPTokenizer, *, with_projection: bool = False):
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=_TEXT_DIM,
        intermediate_size=64,
        projection_dim=_TEXT_DIM,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,  # HunyuanVideo always tokenizes CLIP prompts to 77 tokens
        hidden_act="gelu",
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5_encoder(tokenizer: T5Tokenizer, *, d_model: int = _TEXT_DIM, umt5: bool = False):
    config_cls, model_cls = (UMT5Config, UMT5EncoderModel) if umt5 else (T5Config, T5EncoderModel)
    config = config_cls(
        vocab_size=len(tokenizer),
        d_model=d_model,
        d_kv=d_model // 4,
        d_ff=2 * d_model,
        num_layers=2,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=32,
        feed_forward_proj="gated-gelu",
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        decoder_start_token_id=tokenizer.pad_token_id,
    )
    return model_cls(config).eval()


def _qwen2_5_vl_encoder(tokenizer: Qwen2Tokenizer) -> Qwen2_5_VLForConditionalGeneration:
    ids = tokenizer.convert_tokens_to_ids
    text_config = _decoder_kwargs(
        tokenizer, rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [1, 1, 2]}
    )
    config = Qwen2_5_VLConfig(
        text_config=text_config,
        vision_config={
            "depth": 1,
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_heads": 2,
            "out_hidden_size": _TEXT_DIM,
            "fullatt_block_indexes": [0],
        },
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )
    return Qwen2_5_VLForConditionalGeneration(config).eval()


def _mistral3_encoder(tokenizer: LlamaTokenizer) -> Mistral3ForConditionalGeneration:
    text_config = _decoder_kwargs(tokenizer, num_hidden_layers=3, model_type="mistral", sliding_window=None)
    config = Mistral3Config(
        text_config=text_config,
        vision_config={
            "model_type": "pixtral",
            "hidden_size": 16,
            "intermediate_size": 16,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"),
        spatial_merge_size=2,
    )
    return Mistral3ForConditionalGeneration(config).eval()


# ----------------------------------------------------------------------------------------------------------------
# VAEs
# ----------------------------------------------------------------------------------------------------------------


def _autoencoder_kl(cls: type = diffusers.AutoencoderKL, *, num_blocks: int = 2, **kwargs):
    """2D KL VAE (AutoencoderKL or AutoencoderKLFlux2) with 4 latent channels, spatial scale 2 ** (num_blocks - 1)."""
    return cls(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * num_blocks,
        up_block_types=("UpDecoderBlock2D",) * num_blocks,
        block_out_channels=(8, 16, 16, 16)[:num_blocks],
        layers_per_block=1,
        latent_channels=4,
        norm_num_groups=4,
        sample_size=32,
        **kwargs,
    )


def _autoencoder_wan() -> diffusers.AutoencoderKLWan:
    """Causal 3D VAE: z_dim 4, spatial scale 8, temporal scale 4."""
    return diffusers.AutoencoderKLWan(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 1, 1, 1],
        num_res_blocks=1,
        temperal_downsample=[False, True, True],
        latents_mean=[0.0] * 4,
        latents_std=[1.0] * 4,
    )


# ----------------------------------------------------------------------------------------------------------------
# Families
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Family:
    """One tiny family: its diffusers pipeline class and how each component is built.

    `text`: (suffix, tokenizer factory, encoder factory) per text encoder, giving the `tokenizer{suffix}` and
    `text_encoder{suffix}` components; the encoder factory takes its tokenizer. `transformer`, `vae` and
    `scheduler`: (class or factory, keyword arguments). Build order (the weights depend on it): tokenizers,
    transformer (and `transformer_2`), vae, text encoders in order, scheduler.
    """

    pipeline: str
    text: tuple[tuple[str, Callable, Callable], ...]
    transformer: tuple[Callable, dict]
    vae: tuple[Callable, dict]
    scheduler: tuple[Callable, dict] = (diffusers.FlowMatchEulerDiscreteScheduler, {})
    two_stage: bool = False  # Wan 2.2: a second transformer for the low-noise steps, and its boundary


def _build(family: _Family) -> diffusers.DiffusionPipeline:
    tokenizers = {f"tokenizer{suffix}": make() for suffix, make, _ in family.text}
    make_transformer, transformer_kwargs = family.transformer
    parts = {"transformer": make_transformer(**transformer_kwargs)}
    if family.two_stage:
        parts.update(transformer_2=make_transformer(**transformer_kwargs), boundary_ratio=0.875)
    parts["vae"] = family.vae[0](**family.vae[1])
    for suffix, _, encoder in family.text:
        parts[f"text_encoder{suffix}"] = encoder(tokenizers[f"tokenizer{suffix}"])
    parts["scheduler"] = family.scheduler[0](**family.scheduler[1])
    return getattr(diffusers, family.pipeline)(**parts, **tokenizers)


def _decoder(model_cls: type, config_cls: type, **overrides) -> Callable:
    """A tiny decoder-only text encoder (`_decoder_kwargs`) of `model_cls`, for its tokenizer."""
    return lambda tokenizer: model_cls(config_cls(**_decoder_kwargs(tokenizer, **overrides))).eval()


_KL = (_autoencoder_kl, dict(scaling_factor=1.5, shift_factor=0.06))
_CLIP = ("", _clip_tokenizer, _clip_text_encoder)
_CLIP_PROJ = functools.partial(_clip_text_encoder, with_projection=True)
_FLUX_BLOCKS = dict(num_layers=2, num_single_layers=2, attention_head_dim=_HEAD_DIM, num_attention_heads=_HEADS)
_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=_HEADS, attention_head_dim=_HEAD_DIM, in_channels=4,
            out_channels=4, text_dim=_TEXT_DIM, freq_dim=32, ffn_dim=128, num_layers=4, cross_attn_norm=True,
            qk_norm="rms_norm_across_heads", rope_max_seq_len=32)
_WAN_FAMILY = dict(
    pipeline="WanPipeline",
    text=(("", _t5_tokenizer, functools.partial(_t5_encoder, umt5=True)),),
    transformer=(diffusers.WanTransformer3DModel, _WAN),
    vae=(_autoencoder_wan, {}),
    scheduler=(diffusers.UniPCMultistepScheduler,
               dict(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)),
)

_FAMILIES: dict[str, _Family] = {
    "flux": _Family(
        pipeline="FluxPipeline",
        text=(_CLIP, ("_2", _t5_tokenizer, _t5_encoder)),
        transformer=(diffusers.FluxTransformer2DModel, dict(
            _FLUX_BLOCKS, patch_size=1, in_channels=16,  # 4 latent channels packed 2x2
            joint_attention_dim=_TEXT_DIM, pooled_projection_dim=_TEXT_DIM, guidance_embeds=True,
            axes_dims_rope=_ROPE_AXES)),
        vae=_KL,
    ),
    "qwenimage": _Family(
        pipeline="QwenImagePipeline",
        text=(("", _qwen_tokenizer, _qwen2_5_vl_encoder),),
        transformer=(diffusers.QwenImageTransformer2DModel, dict(
            patch_size=2, in_channels=16, out_channels=4,  # z_dim 4 packed 2x2
            num_layers=4, attention_head_dim=_HEAD_DIM, num_attention_heads=_HEADS, joint_attention_dim=_TEXT_DIM,
            axes_dims_rope=_ROPE_AXES)),
        vae=(diffusers.AutoencoderKLQwenImage, dict(
            base_dim=8, z_dim=4, dim_mult=[1, 2, 2], num_res_blocks=1, temperal_downsample=[False, True],
            latents_mean=[0.0] * 4, latents_std=[1.0] * 4)),
    ),
    "wan": _Family(**_WAN_FAMILY),
    "sd3": _Family(
        pipeline="StableDiffusion3Pipeline",
        text=(("", _clip_tokenizer, _CLIP_PROJ), ("_2", _clip_tokenizer, _CLIP_PROJ),
              ("_3", _t5_tokenizer, functools.partial(_t5_encoder, d_model=2 * _TEXT_DIM))),
        transformer=(diffusers.SD3Transformer2DModel, dict(
            sample_size=16, patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS,
            joint_attention_dim=2 * _TEXT_DIM,  # the two CLIP hidden states, concatenated; T5 d_model
            caption_projection_dim=_HEADS * _HEAD_DIM,
            pooled_projection_dim=2 * _TEXT_DIM,  # the two CLIP pooled projections, concatenated
            pos_embed_max_size=16)),
        vae=_KL,
        scheduler=(diffusers.FlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
    ),
    "zimage": _Family(
        pipeline="ZImagePipeline",
        text=(("", _qwen_tokenizer, _decoder(Qwen3Model, Qwen3Config)),),
        transformer=(diffusers.ZImageTransformer2DModel, dict(
            all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=_HEADS * _HEAD_DIM, n_layers=4,
            n_refiner_layers=1, n_heads=_HEADS, n_kv_heads=_HEADS, cap_feat_dim=_TEXT_DIM, axes_dims=list(_ROPE_AXES),
            axes_lens=[256, 32, 32])),
        vae=_KL,
        scheduler=(diffusers.FlowMatchEulerDiscreteScheduler, dict(shift=3.0)),
    ),
    "flux2": _Family(
        pipeline="Flux2Pipeline",
        text=(("", functools.partial(_llama_tokenizer, _MISTRAL_SPECIAL_TOKENS, padding_side="left",
                                     chat_template=_MISTRAL_CHAT_TEMPLATE), _mistral3_encoder),),
        transformer=(diffusers.Flux2Transformer2DModel, dict(
            _FLUX_BLOCKS, patch_size=1, in_channels=16,  # 4 latent channels, 2x2 patches
            joint_attention_dim=3 * _TEXT_DIM,  # hidden states of 3 text-encoder layers, stacked
            timestep_guidance_channels=32, axes_dims_rope=(4, 4, 4, 4))),
        vae=(_autoencoder_kl, dict(cls=diffusers.AutoencoderKLFlux2)),
    ),
    "wan22": _Family(**_WAN_FAMILY, two_stage=True),
    "hunyuanvideo": _Family(
        pipeline="HunyuanVideoPipeline",
        text=(("", _llama_tokenizer, _decoder(LlamaModel, LlamaConfig, num_hidden_layers=3)),
              ("_2", _clip_tokenizer, _clip_text_encoder)),
        transformer=(diffusers.HunyuanVideoTransformer3DModel, dict(
            in_channels=4, out_channels=4, num_attention_heads=_HEADS, attention_head_dim=_HEAD_DIM, num_layers=2,
            num_single_layers=2, num_refiner_layers=1, patch_size=2, patch_size_t=1, guidance_embeds=True,
            text_embed_dim=_TEXT_DIM, pooled_projection_dim=_TEXT_DIM, rope_axes_dim=_ROPE_AXES)),
        vae=(diffusers.AutoencoderKLHunyuanVideo, dict(
            latent_channels=4, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4,
            spatial_compression_ratio=8, temporal_compression_ratio=4)),
        scheduler=(diffusers.FlowMatchEulerDiscreteScheduler, dict(shift=7.0)),
    ),
    "ltx": _Family(
        pipeline="LTXPipeline",
        text=(("", _t5_tokenizer, _t5_encoder),),
        transformer=(diffusers.LTXVideoTransformer3DModel, dict(
            in_channels=8, out_channels=8, patch_size=1, patch_size_t=1, num_attention_heads=_HEADS,
            attention_head_dim=_HEAD_DIM, cross_attention_dim=_HEADS * _HEAD_DIM, num_layers=4,
            caption_channels=_TEXT_DIM)),
        vae=(diffusers.AutoencoderKLLTXVideo, dict(
            latent_channels=8, block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
            layers_per_block=(1, 1, 1, 1, 1), decoder_layers_per_block=(1, 1, 1, 1, 1),
            spatio_temporal_scaling=(True, True, False, False),
            decoder_spatio_temporal_scaling=(True, True, False, False), patch_size=1, patch_size_t=1)),
    ),
    "cogview4": _Family(
        pipeline="CogView4Pipeline",
        text=(("", _qwen_tokenizer, _decoder(GlmModel, GlmConfig)),),
        transformer=(diffusers.CogView4Transformer2DModel, dict(
            patch_size=2, in_channels=4, out_channels=4, num_layers=4, attention_head_dim=_HEAD_DIM,
            num_attention_heads=_HEADS, text_embed_dim=_TEXT_DIM, time_embed_dim=32, condition_dim=16,
            sample_size=16, pos_embed_max_size=16, rope_axes_dim=(32, 32))),
        vae=(_autoencoder_kl, dict(scaling_factor=1.5)),
        scheduler=(diffusers.FlowMatchEulerDiscreteScheduler, dict(
            base_shift=0.25, max_shift=0.75, base_image_seq_len=256, use_dynamic_shifting=True,
            time_shift_type="linear")),
    ),
    "lumina2": _Family(
        pipeline="Lumina2Pipeline",
        text=(("", _gemma_tokenizer, _decoder(Gemma2Model, Gemma2Config, query_pre_attn_scalar=8)),),
        transformer=(diffusers.Lumina2Transformer2DModel, dict(
            sample_size=16, patch_size=2, in_channels=4, hidden_size=_HEADS * _HEAD_DIM, num_layers=4,
            num_refiner_layers=1, num_attention_heads=_HEADS,
            num_kv_heads=_HEADS,  # real Lumina 2 has GQA (24 / 8); 4 kv heads keep 4-rank head sharding simple
            multiple_of=16, axes_dim_rope=_ROPE_AXES, axes_lens=(300, 64, 64), cap_feat_dim=_TEXT_DIM)),
        vae=(_autoencoder_kl, dict(num_blocks=4, scaling_factor=1.5, shift_factor=0.06)),  # the pipeline assumes 8
    ),
    "chroma": _Family(
        pipeline="ChromaPipeline",
        text=(("", _t5_tokenizer, _t5_encoder),),
        transformer=(diffusers.ChromaTransformer2DModel, dict(
            _FLUX_BLOCKS, patch_size=1, in_channels=16, joint_attention_dim=_TEXT_DIM, axes_dims_rope=_ROPE_AXES,
            approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1)),
        vae=_KL,
    ),
}

TINY_FAMILIES: tuple[str, ...] = tuple(_FAMILIES)

_IMAGE = dict(height=32, width=32)
_VIDEO = dict(height=64, width=64, num_frames=5)
_NEG = dict(negative_prompt="blurry", max_sequence_length=_TEXT_LEN)

# Per-family call arguments, besides prompt, num_inference_steps, generator and output_type.
_CALL_KWARGS: dict[str, dict[str, Any]] = {
    # Guidance-distilled (embedded guidance) and true CFG with the negative prompt.
    "flux": dict(_IMAGE, **_NEG, guidance_scale=3.5, true_cfg_scale=2.0),
    "qwenimage": dict(_IMAGE, **_NEG, true_cfg_scale=4.0),
    "wan": dict(_VIDEO, **_NEG, guidance_scale=5.0),
    "sd3": dict(_IMAGE, **_NEG, guidance_scale=5.0),
    "zimage": dict(_IMAGE, **_NEG, guidance_scale=4.0),
    # Guidance-distilled only; 3 text-encoder layers; the system message takes ~30 of the 48 tokens.
    "flux2": dict(_IMAGE, guidance_scale=4.0, max_sequence_length=48, text_encoder_out_layers=(1, 2, 3)),
    "wan22": dict(_VIDEO, **_NEG, guidance_scale=5.0, guidance_scale_2=4.0),
    "hunyuanvideo": dict(_VIDEO, **_NEG, guidance_scale=6.0, true_cfg_scale=2.0),
    "ltx": dict(height=32, width=32, num_frames=5, **_NEG, guidance_scale=3.0),
    "cogview4": dict(_IMAGE, **_NEG, guidance_scale=5.0),
    # The pipeline prepends a ~30-token system prompt.
    "lumina2": dict(height=128, width=128, negative_prompt="blurry", max_sequence_length=48, guidance_scale=4.0),
    "chroma": dict(_IMAGE, **_NEG, guidance_scale=4.0),
}


def _check_family(family: str) -> None:
    if family not in _FAMILIES:
        raise ValueError(f"Unknown tiny pipeline family {family!r}; allowed values: {', '.join(TINY_FAMILIES)}")


def tiny_pipeline(family: str, *, seed: int = 0, dtype: torch.dtype = torch.float32) -> diffusers.DiffusionPipeline:
    """Builds the tiny pipeline of ``family`` (on CPU, progress bars disabled).

    Deterministic: the same ``seed`` gives identical weights; the global torch RNG state is left untouched.
    Raises ``ValueError`` naming ``family`` and the allowed values for an unknown family.
    """
    _check_family(family)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        pipe = _build(_FAMILIES[family])
    if dtype != torch.float32:
        _cast(pipe, dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _cast(pipe: diffusers.DiffusionPipeline, dtype: torch.dtype) -> None:
    """Casts the models like ``from_pretrained(torch_dtype=dtype)``: diffusers' ``_keep_in_fp32_modules`` (Wan's
    norms, time embedder...) stay in float32. (``pipe.to(dtype)`` casts everything and warns for every model.)"""
    for component in pipe.components.values():
        if not isinstance(component, torch.nn.Module):
            continue
        keep = keep_in_fp32_modules(component) if isinstance(component, diffusers.ModelMixin) else ()
        for name, tensor in [*component.named_parameters(), *component.named_buffers()]:
            if tensor.is_floating_point():
                fp32 = any(module in name.split(".") for module in keep)
                tensor.data = tensor.data.to(torch.float32 if fp32 else dtype)


def tiny_call_kwargs(family: str, *, num_inference_steps: int = 4, seed: int = 0) -> dict:
    """Keyword arguments (besides the prompt) for a fast, deterministic call of ``tiny_pipeline(family)``.

    height / width (num_frames for video), guidance settings that run true classifier-free guidance where the
    pipeline supports it, a seeded CPU generator, ``output_type="pt"`` and a small ``max_sequence_length``.
    """
    _check_family(family)
    kwargs = dict(_CALL_KWARGS[family])
    if family == "hunyuanvideo":
        kwargs["prompt_template"] = _hunyuan_prompt_template()
    kwargs.update(
        num_inference_steps=num_inference_steps,
        generator=torch.Generator("cpu").manual_seed(seed),
        output_type="pt",
    )
    return kwargs


def _hunyuan_prompt_template() -> dict:
    """HunyuanVideo's default prompt template, with ``crop_start`` = its prefix length under the tiny tokenizer."""
    template = hunyuan_video_prompt_template()["template"]
    crop_start = len(_llama_tokenizer()(template.split("{}")[0]).input_ids)
    return {"template": template, "crop_start": crop_start}
