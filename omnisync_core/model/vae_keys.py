"""Pure state-dict key maps between diffusers ``AutoencoderKLWan`` and the original Wan2.1 VAE layout.

Original (Wan2.1 ``wan/modules/vae.py``, also ComfyUI's ``wan_2.1_vae.safetensors``)::

    encoder.conv1 / encoder.downsamples.N.* / encoder.middle.{0,1,2}.* / encoder.head.{0,2}.*
    conv1 (quant) / conv2 (post-quant)
    decoder.conv1 / decoder.middle.* / decoder.upsamples.N.* / decoder.head.{0,2}.*

Inside a residual block: ``residual.0`` (norm), ``residual.2`` (conv), ``residual.3`` (norm), ``residual.6`` (conv),
``shortcut``. diffusers names them ``norm1, conv1, norm2, conv2, conv_shortcut`` and groups the flat decoder list
``upsamples`` into ``up_blocks.i.resnets.j`` / ``up_blocks.i.upsamplers.0``. Values are passed through untouched;
keys that belong to neither layout are passed through unchanged so that a strict load reports them.
"""

from __future__ import annotations

import re
from typing import Mapping, TypeVar

V = TypeVar("V")

_RES_D2W = {"norm1": "residual.0", "conv1": "residual.2", "norm2": "residual.3", "conv2": "residual.6",
            "conv_shortcut": "shortcut"}
_RES_W2D = {w: d for d, w in _RES_D2W.items()}
_TOP_D2W = {"quant_conv": "conv1", "post_quant_conv": "conv2"}
_TOP_W2D = {w: d for d, w in _TOP_D2W.items()}
_HEAD_D2W = {"conv_in": "conv1", "norm_out": "head.0", "conv_out": "head.2"}
_HEAD_W2D = {w: d for d, w in _HEAD_D2W.items()}

_UP_RESNET = re.compile(r"decoder\.up_blocks\.(\d+)\.resnets\.(\d+)\.(.+)")
_UP_SAMPLER = re.compile(r"decoder\.up_blocks\.(\d+)\.upsamplers\.0\.(.+)")
_MID_D = re.compile(r"(encoder|decoder)\.mid_block\.(resnets|attentions)\.(\d+)\.(.+)")
_MID_W = re.compile(r"(encoder|decoder)\.middle\.(\d+)\.(.+)")
_UPSAMPLES_W = re.compile(r"decoder\.upsamples\.(\d+)\.(.+)")


def _res_d2w(rest: str) -> str:
    head, _, tail = rest.partition(".")
    return f"{_RES_D2W[head]}.{tail}" if head in _RES_D2W else rest


def _res_w2d(rest: str) -> str:
    parts = rest.split(".")
    if parts[0] == "residual" and len(parts) > 2 and f"residual.{parts[1]}" in _RES_W2D:
        return ".".join([_RES_W2D[f"residual.{parts[1]}"], *parts[2:]])
    if parts[0] == "shortcut":
        return ".".join(["conv_shortcut", *parts[1:]])
    return rest


def _swap_prefix(key: str, table: Mapping[str, str], prefix: str = "") -> str | None:
    for old, new in table.items():
        if key.startswith(f"{prefix}{old}."):
            return f"{prefix}{new}.{key[len(prefix) + len(old) + 1:]}"
    return None


def diffusers_to_wan_vae(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename a diffusers ``AutoencoderKLWan`` state dict to the original Wan2.1 key layout."""
    resnet_ids = [int(m.group(2)) for k in sd if (m := _UP_RESNET.fullmatch(k))]
    per_level = max(resnet_ids, default=-1) + 2  # num_res_blocks + 1 resnets, then one upsampler
    out: dict[str, V] = {}
    for key, value in sd.items():
        new = _swap_prefix(key, _TOP_D2W)
        if new is None:
            for side in ("encoder.", "decoder."):
                new = new or _swap_prefix(key, _HEAD_D2W, side)
        if new is None and (m := _MID_D.fullmatch(key)):
            side, kind, i, rest = m.groups()
            new = f"{side}.middle.{2 * int(i) + (kind == 'attentions')}.{_res_d2w(rest)}"
        if new is None and key.startswith("encoder.down_blocks."):
            idx, _, rest = key[len("encoder.down_blocks."):].partition(".")
            new = f"encoder.downsamples.{idx}.{_res_d2w(rest)}"
        if new is None and (m := _UP_RESNET.fullmatch(key)):
            level, j, rest = int(m.group(1)), int(m.group(2)), m.group(3)
            new = f"decoder.upsamples.{level * per_level + j}.{_res_d2w(rest)}"
        if new is None and (m := _UP_SAMPLER.fullmatch(key)):
            level, rest = int(m.group(1)), m.group(2)
            new = f"decoder.upsamples.{level * per_level + per_level - 1}.{rest}"
        out[new or key] = value
    return out


def _decoder_groups(sd: Mapping[str, object]) -> dict[int, str]:
    """Flat ``decoder.upsamples`` index -> diffusers prefix, split at the resample layers."""
    ids, resample_ids = set(), set()
    for key in sd:
        if m := _UPSAMPLES_W.fullmatch(key):
            ids.add(int(m.group(1)))
            if m.group(2).startswith(("resample.", "time_conv.")):
                resample_ids.add(int(m.group(1)))
    names, level, j = {}, 0, 0
    for idx in sorted(ids):
        if idx in resample_ids:
            names[idx] = f"decoder.up_blocks.{level}.upsamplers.0"
            level, j = level + 1, 0
        else:
            names[idx] = f"decoder.up_blocks.{level}.resnets.{j}"
            j += 1
    return names


def wan_vae_to_diffusers(sd: Mapping[str, V]) -> dict[str, V]:
    """Rename an original Wan2.1 VAE state dict to the diffusers ``AutoencoderKLWan`` key layout."""
    groups = _decoder_groups(sd)
    out: dict[str, V] = {}
    for key, value in sd.items():
        new = _swap_prefix(key, _TOP_W2D)
        if new is None:
            for side in ("encoder.", "decoder."):
                new = new or _swap_prefix(key, _HEAD_W2D, side)
        if new is None and (m := _MID_W.fullmatch(key)):
            side, i, rest = m.group(1), int(m.group(2)), m.group(3)
            kind = "attentions" if i % 2 else "resnets"
            new = f"{side}.mid_block.{kind}.{i // 2}.{_res_w2d(rest)}"
        if new is None and key.startswith("encoder.downsamples."):
            idx, _, rest = key[len("encoder.downsamples."):].partition(".")
            new = f"encoder.down_blocks.{idx}.{_res_w2d(rest)}"
        if new is None and (m := _UPSAMPLES_W.fullmatch(key)):
            new = f"{groups[int(m.group(1))]}.{_res_w2d(m.group(2))}"
        out[new or key] = value
    return out


def is_diffusers_vae(sd: Mapping[str, object]) -> bool:
    """True when the keys look like diffusers' ``AutoencoderKLWan`` (rather than the original Wan2.1 layout)."""
    return any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "quant_conv.", "post_quant_conv."))
               for k in sd)
