"""Text conditioning shared by the families that take umT5 prompts (HuMo, InfiniteTalk): ComfyUI's CONDITIONING, a
prompt-embeddings file from ``omnisync encode-prompt``, or the prompts encoded here with the umT5 text encoder."""

from __future__ import annotations

import gc
from typing import Any

import torch
from torch import Tensor

from ..errors import InputError
from .base import ModelFiles


def _conditioning_tensor(value: Any, name: str) -> Tensor:
    """A ComfyUI CONDITIONING (``[[tensor, {...}], ...]``) or a plain tensor -> ``[1, L, D]``."""
    while isinstance(value, (list, tuple)) and value:
        value = value[0]
    if not isinstance(value, Tensor) or value.ndim not in (2, 3):
        raise InputError(f"the {name} text conditioning must be umT5 features [1, L, D]")
    return value.reshape(1, value.shape[-2], value.shape[-1]).detach().float().cpu()


def text_conditioning(files: ModelFiles, text_dim: int, text_len: int, device, default_prompt: str,
                      default_negative: "str | None" = None) -> tuple[Tensor, Tensor]:
    """(positive, negative) umT5 features ``[1, L, text_dim]`` float32 on the CPU: ComfyUI's conditioning, else a
    prompt-embeddings file, else the prompts (``files.prompt``, else the family's ``default_prompt``;
    ``files.negative_prompt``, else ``default_negative``, else Wan's Chinese negative prompt) encoded with the umT5
    text encoder (loaded once, freed at once)."""
    from ..text.prompt import WAN_DEFAULT_NEGATIVE_PROMPT, load_prompt_embeds

    if files.conditioning is not None:
        if len(files.conditioning) != 2:
            raise InputError("the text conditioning must be a (positive, negative) pair")
        pos, neg = (_conditioning_tensor(c, n) for c, n in zip(files.conditioning, ("positive", "negative")))
        source = "the text conditioning"
    elif files.prompt_embeds is not None:
        embeds = load_prompt_embeds(files.prompt_embeds)
        pos, neg = embeds.positive, embeds.negative
        source = files.prompt_embeds.name
    elif "text_encoder" in files.companions:
        from ..text.prompt import encode_prompt_pair
        from ..text.umt5 import load_umt5

        path = files.companions["text_encoder"]
        device = torch.device(device)
        encoder, tokenizer = load_umt5(path, device=device,
                                       dtype=torch.bfloat16 if device.type == "cuda" else torch.float32)
        try:
            embeds = encode_prompt_pair(encoder, tokenizer, files.prompt or default_prompt,
                                        files.negative_prompt or default_negative or WAN_DEFAULT_NEGATIVE_PROMPT, device,
                                        encoder_name=path.name)
        finally:
            del encoder
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        pos, neg = embeds.positive, embeds.negative
        source = path.name
    else:
        raise InputError(f"{files.recognition.label} needs text conditioning: a umT5 text encoder "
                         f"(--text-encoder umt5_xxl_fp16.safetensors) or a prompt-embeddings file "
                         f"(--prompt-embeds, made by `omnisync encode-prompt`)")
    for t in (pos, neg):
        if t.shape[-1] != text_dim:
            raise InputError(f"{source} holds {t.shape[-1]}-wide text features; {files.recognition.label} takes "
                             f"{text_dim} (umT5-xxl)")
    return pos[:, :text_len].float().cpu(), neg[:, :text_len].float().cpu()


__all__ = ["text_conditioning"]
