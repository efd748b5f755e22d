"""Prompt features the Wan way, and a file cache of them so the 11 GB umT5 runs once per prompt.

Wan2.1 / HuMo tokenize to at most ``text_len = 512`` tokens, run umT5 with the padding mask, keep the first
``len`` rows of each prompt and zero the rest: the DiT gets ``[n, 512, 4096]`` with zero rows after the tokens.

Prompt-embeddings file (``omnisync encode-prompt``): safetensors with ``positive`` ``[1, n_pos, dim]`` and
``negative`` ``[1, n_neg, dim]`` (float32, only the token rows: a 60-token prompt is 60 x 4096 x 4 B = 1 MB instead of
8 MB) and metadata ``format = "omnisync-prompt-embeds"``, ``format_version``, ``prompt``, ``negative_prompt``,
``encoder``, ``text_len``, ``dim``, ``positive_len``, ``negative_len``. :func:`load_prompt_embeds` pads back to
``text_len`` rows with zeros.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from safetensors import torch as st

from .. import __version__
from ..fsutil import publish
from ..model.loading import CheckpointError, iter_safetensors, read_header, resolve_device
from .tokenizer import UMT5Tokenizer
from .umt5 import UMT5Encoder, load_umt5

__all__ = ["TEXT_LEN", "HUMO_DEFAULT_PROMPT", "WAN_DEFAULT_NEGATIVE_PROMPT", "PROMPT_EMBEDS_FORMAT", "PromptEmbeds",
           "PromptEmbedsError", "encode_prompts", "encode_prompt_pair", "save_prompt_embeds", "load_prompt_embeds",
           "encode_prompt_file"]

TEXT_LEN = 512
# HuMo ships no default positive prompt (its examples are long scene descriptions); this short neutral one is ours.
HUMO_DEFAULT_PROMPT = "A person is talking to the camera, with clear and natural mouth movements."
# HuMo's sample_neg_prompt (configs/inference/generate*.yaml), Wan2.1's standard Chinese negative prompt.
WAN_DEFAULT_NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，丑陋的，"
    "残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，静止不动的画面，杂乱的背景，"
    "三条腿，背景人很多，倒着走")
PROMPT_EMBEDS_FORMAT = "omnisync-prompt-embeds"
FORMAT_VERSION = "1"

ProgressFn = Callable[[str, int, int], None]


class PromptEmbedsError(CheckpointError):
    """A prompt-embeddings file is missing, corrupt, or not one written by :func:`save_prompt_embeds`."""


@dataclass
class PromptEmbeds:
    """Encoded prompt pair: ``positive`` / ``negative`` ``[1, text_len, dim]`` float32, zero after the tokens."""

    positive: torch.Tensor
    negative: torch.Tensor
    prompt: str
    negative_prompt: str
    encoder_name: str = ""
    lengths: tuple[int, int] = (0, 0)  # token rows (EOS included) of positive and negative


@torch.no_grad()
def encode_prompts(encoder: UMT5Encoder, tokenizer: UMT5Tokenizer, texts: "str | Sequence[str]", device=None,
                   text_len: int = TEXT_LEN) -> tuple[torch.Tensor, torch.Tensor]:
    """``(features [n, text_len, d_model] float32, lengths [n] int64)``: Wan's convention, rows beyond each
    prompt's length exactly zero.

    The encoder runs on the longest prompt's tokens, not on all ``text_len`` positions: padded keys are masked
    (their softmax weight is exactly 0) and the position bias only depends on distances, so the kept rows are those
    of a 512-wide run up to float rounding, at a fraction of the cost (60 tokens: ~8x fewer FLOPs than 512).
    """
    ids, mask = tokenizer(texts, max_length=text_len)
    lengths = mask.sum(1)
    width = int(lengths.max())
    dev = torch.device(device) if device is not None else encoder.shared.weight.device
    out = encoder(ids[:, :width].to(dev), mask[:, :width].to(dev)).float()
    keep = mask[:, :width, None].to(out.device).bool()
    features = torch.zeros(len(lengths), text_len, out.shape[-1], dtype=torch.float32, device=out.device)
    features[:, :width] = torch.where(keep, out, torch.zeros((), device=out.device))
    return features, lengths


def encode_prompt_pair(encoder: UMT5Encoder, tokenizer: UMT5Tokenizer, prompt: str, negative_prompt: str,
                       device=None, encoder_name: str = "") -> PromptEmbeds:
    """Encode the positive and negative prompt (one batch of two) into :class:`PromptEmbeds` on the CPU."""
    features, lengths = encode_prompts(encoder, tokenizer, [prompt, negative_prompt], device)
    features = features.cpu()
    return PromptEmbeds(features[:1], features[1:], prompt, negative_prompt, encoder_name,
                        (int(lengths[0]), int(lengths[1])))


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor) or not t.is_floating_point() or t.dim() not in (2, 3) or (
            t.dim() == 3 and t.shape[0] != 1):
        raise PromptEmbedsError(f"{name} must be a float tensor [1, L, dim] or [L, dim], got "
                                f"{getattr(t, 'shape', type(t).__name__)}.")
    return t.detach().reshape(t.shape[-2], t.shape[-1]).float().cpu()


def _length(rows: torch.Tensor) -> int:
    nonzero = rows.abs().amax(-1).nonzero()
    return int(nonzero[-1]) + 1 if len(nonzero) else 0


def save_prompt_embeds(path, positive: torch.Tensor, negative: torch.Tensor, *, prompt: str, negative_prompt: str,
                       encoder_name: str, lengths: Optional[tuple[int, int]] = None) -> Path:
    """Write a prompt pair to ``path`` atomically (a ``.partial`` file renamed into place). ``positive`` /
    ``negative`` are ``[1, L, dim]`` zero-padded (Wan's convention); only their first ``lengths`` rows are stored
    (``lengths`` None: up to the last non-zero row). Returns the path."""
    pos, neg = _rows(positive, "positive"), _rows(negative, "negative")
    if pos.shape != neg.shape:
        raise PromptEmbedsError(f"positive {tuple(pos.shape)} and negative {tuple(neg.shape)} differ in shape.")
    n_pos, n_neg = lengths if lengths is not None else (_length(pos), _length(neg))
    if not (0 <= n_pos <= len(pos) and 0 <= n_neg <= len(neg)):
        raise PromptEmbedsError(f"lengths {n_pos}, {n_neg} do not fit {len(pos)} rows.")
    meta = {"format": PROMPT_EMBEDS_FORMAT, "format_version": FORMAT_VERSION, "prompt": prompt,
            "negative_prompt": negative_prompt, "encoder": encoder_name, "text_len": str(len(pos)),
            "dim": str(pos.shape[1]), "positive_len": str(n_pos), "negative_len": str(n_neg),
            "omnisync_version": __version__}
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        st.save_file({"positive": pos[None, :n_pos].contiguous(), "negative": neg[None, :n_neg].contiguous()},
                     str(partial), metadata=meta)
        publish(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def load_prompt_embeds(path) -> PromptEmbeds:
    """Read a file written by :func:`save_prompt_embeds`: ``positive`` / ``negative`` ``[1, text_len, dim]``
    float32, zero after the stored rows. Raises :class:`PromptEmbedsError` (one sentence) for a missing, corrupt or
    foreign file."""
    path = Path(path).expanduser()
    try:
        header, meta = read_header(path)
    except CheckpointError as e:
        raise PromptEmbedsError(f"Cannot read prompt embeddings: {e}") from None
    if meta.get("format") != PROMPT_EMBEDS_FORMAT:
        raise PromptEmbedsError(f"{path.name} is not an OmniSync prompt-embeddings file (make one with "
                                f"`omnisync encode-prompt`).")
    if meta.get("format_version") != FORMAT_VERSION:
        raise PromptEmbedsError(f"{path.name} has prompt-embeddings format version {meta.get('format_version')!r}; "
                                f"this OmniSync reads version {FORMAT_VERSION}.")
    try:
        text_len, dim = int(meta["text_len"]), int(meta["dim"])
        n = {"positive": int(meta["positive_len"]), "negative": int(meta["negative_len"])}
    except (KeyError, ValueError):
        raise PromptEmbedsError(f"{path.name} is corrupt: its prompt-embeddings metadata is incomplete.") from None
    for key, rows in n.items():
        info = header.get(key)
        if info is None or info.shape != (1, rows, dim) or rows > text_len or info.dtype != "F32":
            raise PromptEmbedsError(f"{path.name} is corrupt: tensor {key!r} is "
                                    f"{'missing' if info is None else f'{info.dtype} {list(info.shape)}'}, expected "
                                    f"F32 [1, {rows}, {dim}] (at most {text_len} rows).")
    padded = {}
    try:
        for key, t in iter_safetensors(path, keys=("positive", "negative")):
            padded[key] = torch.zeros(1, text_len, dim, dtype=torch.float32)
            padded[key][:, : t.shape[1]] = t
    except CheckpointError as e:
        raise PromptEmbedsError(f"Cannot read prompt embeddings: {e}") from None
    return PromptEmbeds(padded["positive"], padded["negative"], meta.get("prompt", ""),
                        meta.get("negative_prompt", ""), meta.get("encoder", ""), (n["positive"], n["negative"]))


def encode_prompt_file(text_encoder_path, out_path, prompt: Optional[str] = None,
                       negative_prompt: Optional[str] = None, device="auto", dtype=None,
                       progress: Optional[ProgressFn] = None) -> Path:
    """Load umT5 from ``text_encoder_path`` (a ComfyUI umt5 safetensors), encode the prompt pair, write it to
    ``out_path`` (see :func:`save_prompt_embeds`) and free the encoder. ``prompt`` None -> :data:`HUMO_DEFAULT_PROMPT`;
    ``negative_prompt`` None or "" -> :data:`WAN_DEFAULT_NEGATIVE_PROMPT` (HuMo's rule for an empty one).
    ``device``/``dtype`` as :func:`~omnisync_core.text.umt5.load_umt5` (memory: 11.4 GB for the fp16 file, 6.7 GB
    for the fp8 one). ``progress(stage, done, total)``: "load-text-encoder" per tensor, then "encode-prompt"."""
    prompt = HUMO_DEFAULT_PROMPT if prompt is None else prompt
    negative_prompt = negative_prompt or WAN_DEFAULT_NEGATIVE_PROMPT
    dev = resolve_device(device)
    encoder, tokenizer = load_umt5(text_encoder_path, device=dev, dtype=dtype, progress=progress)
    try:
        if progress is not None:
            progress("encode-prompt", 0, 1)
        embeds = encode_prompt_pair(encoder, tokenizer, prompt, negative_prompt, dev,
                                    encoder_name=Path(text_encoder_path).name)
        if progress is not None:
            progress("encode-prompt", 1, 1)
    finally:
        del encoder
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return save_prompt_embeds(out_path, embeds.positive, embeds.negative, prompt=prompt,
                              negative_prompt=negative_prompt, encoder_name=embeds.encoder_name,
                              lengths=embeds.lengths)
