"""Float8 weights with one scale per tensor (ComfyUI's "scaled fp8" layout), dequantised per call.

ComfyUI's ``*_fp8_e4m3fn_scaled.safetensors`` files store each Linear weight ``W`` as ``q = W / s`` in float8 e4m3
(``<layer>.weight``) beside a float32 scalar ``s`` (``<layer>.scale_weight``), plus a zero-element tensor named
``scaled_fp8`` whose dtype is the float8 kind (comfy/ops.py ``scaled_fp8_ops``). The weight that is used is
``q.to(dtype) * s``. Some files also hold ``<layer>.scale_input`` for fp8 matrix products on the GPU; once the weight
is dequantised it has no effect, so it is not needed here.

What it costs: a float8 weight takes 1 byte per value, half of fp16. :class:`FP8Linear` keeps it that way and
builds the ``dtype`` weight for each call, so the transient is one layer's weight in the compute dtype (e.g. a
4096 x 10240 umT5 FFN weight: 42 M values x 2 B = 84 MB in bf16, 168 MB in fp32), freed when the call returns.
"""

from __future__ import annotations

from typing import Callable, Iterable, Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["FP8_DTYPES", "SCALED_FP8_MARKER", "FP8Linear", "fp8_max", "quantize_fp8", "dequantize_fp8",
           "to_scaled_fp8", "is_fp8"]

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALED_FP8_MARKER = "scaled_fp8"
_CHUNK = 1 << 24  # values quantised at a time: bounds the fp32 transient to 64 MB whatever the tensor's size


def is_fp8(t: torch.Tensor | torch.dtype) -> bool:
    return (t if isinstance(t, torch.dtype) else t.dtype) in FP8_DTYPES


def fp8_max(dtype: torch.dtype = torch.float8_e4m3fn) -> float:
    """Largest finite value of a float8 dtype (448 for e4m3fn, 57344 for e5m2)."""
    return float(torch.finfo(dtype).max)


def quantize_fp8(weight: torch.Tensor, dtype: torch.dtype = torch.float8_e4m3fn) -> tuple[torch.Tensor, torch.Tensor]:
    """``(q, scale)`` with ``q = weight / scale`` in ``dtype`` and ``scale = amax(|weight|) / fp8_max`` (float32, a
    0-d tensor; 1 for an all-zero weight), so the largest value maps to the largest float8 value.

    Memory: the result takes 1 byte per value; the conversion works on slices of 16 M values (64 MB in fp32), so a
    weight never exists twice in fp32.
    """
    if dtype not in FP8_DTYPES:
        raise ValueError(f"quantize_fp8 makes float8 weights; {dtype} is not one of {FP8_DTYPES}.")
    top = fp8_max(dtype)
    amax = weight.detach().abs().amax().float() if weight.numel() else torch.zeros((), device=weight.device)
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax)).reshape(())
    flat = weight.detach().reshape(-1)
    q = torch.empty(flat.shape, dtype=dtype, device=weight.device)
    for i in range(0, flat.numel(), _CHUNK):
        q[i:i + _CHUNK] = (flat[i:i + _CHUNK].float() / scale).clamp_(-top, top).to(dtype)
    return q.reshape(weight.shape), scale


def dequantize_fp8(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``q.to(dtype) * scale``, in ``dtype`` (ComfyUI's order of operations)."""
    return q.to(dtype) * scale.to(device=q.device, dtype=dtype)


class FP8Linear(nn.Module):
    """A Linear layer (``y = x W^T + b``) whose weight stays float8 with one float32 scale; ``W = weight * scale``
    is built in the input's dtype at each call. State dict keys: ``weight`` (float8), ``scale_weight`` (0-d
    float32) and ``bias`` if any, as ComfyUI's scaled fp8 files name them.

    ``module.to(dtype)`` moves it between devices but never converts the float8 weight or its scale.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 fp8_dtype: torch.dtype = torch.float8_e4m3fn, device=None):
        super().__init__()
        if fp8_dtype not in FP8_DTYPES:
            raise ValueError(f"fp8_dtype must be one of {FP8_DTYPES}, got {fp8_dtype}.")
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.zeros(out_features, in_features, dtype=fp8_dtype, device=device),
                                   requires_grad=False)
        self.scale_weight = nn.Parameter(torch.ones((), dtype=torch.float32, device=device), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features, device=device), requires_grad=False) if bias else None

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> "FP8Linear":
        """Quantise a ``[out, in]`` weight (see :func:`quantize_fp8`) into a new layer on the weight's device."""
        with torch.device("meta"):
            layer = cls(weight.shape[1], weight.shape[0], bias is not None, fp8_dtype)
        q, scale = quantize_fp8(weight, fp8_dtype)
        state = {"weight": q, "scale_weight": scale}
        if bias is not None:
            state["bias"] = bias.detach().clone()
        layer.load_state_dict(state, assign=True)
        return layer.requires_grad_(False)

    def dequantized(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize_fp8(self.weight, self.scale_weight, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(x, self.dequantized(x.dtype), bias)

    def _apply(self, fn, recurse=True):
        # keep the float8 weight and the float32 scale as they are under .to(dtype)/.half(); devices still move
        def same_dtype(t):
            out = fn(t)
            return out.to(t.dtype) if out.dtype != t.dtype and (is_fp8(t) or t.dim() == 0) else out
        return super()._apply(same_dtype, recurse)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weight={self.weight.dtype}")


def to_scaled_fp8(state_dict: Mapping[str, torch.Tensor], linear_weights: Iterable[str] | Callable[[str], bool],
                  fp8_dtype: torch.dtype = torch.float8_e4m3fn) -> dict[str, torch.Tensor]:
    """A state dict in ComfyUI's scaled fp8 layout: each Linear weight named in ``linear_weights`` (names, or a
    predicate on names, all ending in ``weight``) becomes float8 plus ``<layer>.scale_weight``; other tensors are
    kept as given; the ``scaled_fp8`` marker is added. Memory: the float8 copies (1 byte per value) beside the input.
    """
    keep = linear_weights if callable(linear_weights) else set(linear_weights).__contains__
    out: dict[str, torch.Tensor] = {}
    for name, t in state_dict.items():
        if keep(name):
            if not name.endswith("weight"):
                raise ValueError(f"{name!r} is not a weight; only Linear weights are quantised.")
            out[name], out[name[: -len("weight")] + "scale_weight"] = quantize_fp8(t, fp8_dtype)
        else:
            out[name] = t
    out[SCALED_FP8_MARKER] = torch.empty(0, dtype=fp8_dtype)
    return out
