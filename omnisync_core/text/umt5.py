"""umT5 encoder (the text encoder of Wan2.1, HuMo and InfiniteTalk) and its loader for Comfy-Org's files.

umT5 is T5 v1.1 with one relative position bias per layer: pre-norm blocks of self-attention and a gated-GELU
feed-forward (``wo(gelu_tanh(wi_0 x) * wi_1 x)``), RMS layer norms without bias or mean ("T5LayerNorm"), attention
logits ``q k^T + bias`` with no 1/sqrt(d) scaling, bidirectional position buckets (32 buckets, max distance 128), and
a final layer norm. Module names follow Hugging Face / ComfyUI (``shared``, ``encoder.block.N.layer.0.SelfAttention``,
``encoder.block.N.layer.1.DenseReluDense``, ``encoder.final_layer_norm``), so the state dict of
:class:`UMT5Encoder` is the key layout of ComfyUI's ``umt5_xxl_*.safetensors`` files without a rename.

Weights stay in the dtype they are stored in and are cast to the compute dtype at each call, as ComfyUI does; see
:func:`load_umt5` for what each choice costs in memory.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from ..model.dit import WeightsError
from ..model.loading import (
    CheckpointError, CheckpointMismatchError, TensorInfo, iter_safetensors, read_header, resolve_device,
    resolve_dtype, validate_state_dict,
)
from ..model.quant import FP8_DTYPES, SCALED_FP8_MARKER, FP8Linear, is_fp8
from .tokenizer import SPIECE_KEY, UMT5Tokenizer

__all__ = ["UMT5Config", "UMT5_PRESETS", "UMT5Encoder", "umt5_config_from_shapes", "umt5_expected_shapes",
           "load_umt5", "relative_position_bucket"]

LoadProgress = Callable[[str, int, int], None]

_ST_FP8 = {"F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_LINEARS = ("layer.0.SelfAttention.q", "layer.0.SelfAttention.k", "layer.0.SelfAttention.v",
            "layer.0.SelfAttention.o", "layer.1.DenseReluDense.wi_0", "layer.1.DenseReluDense.wi_1",
            "layer.1.DenseReluDense.wo")
_IGNORED = re.compile(r"(^|\.)scale_input$|^encoder\.embed_tokens\.weight$")  # fp8-matmul hints; HF's tied copy


@dataclass(frozen=True)
class UMT5Config:
    """umT5 encoder shapes. ``max_distance`` and ``eps`` are not visible in the weights (128 and 1e-6 in umT5)."""

    vocab_size: int = 256384
    d_model: int = 4096
    d_kv: int = 64
    num_heads: int = 64
    d_ff: int = 10240
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6

    @property
    def inner_dim(self) -> int:
        return self.d_kv * self.num_heads

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "UMT5Config":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


UMT5_PRESETS = {
    "umt5-xxl": UMT5Config(),
    "tiny": UMT5Config(vocab_size=512, d_model=32, d_kv=8, num_heads=4, d_ff=48, num_layers=2),
}


# ---------------------------------------------------------------- layers

class CastLinear(nn.Linear):
    """``nn.Linear`` without bias whose weight is cast to the input's dtype at each call (no copy when equal)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight.to(x.dtype))


class CastEmbedding(nn.Embedding):
    """Embedding that returns ``dtype`` rows; a float8 table is gathered first, then cast (and NaN-cleaned)."""

    def reset_parameters(self) -> None:
        if not self.weight.is_meta:  # random init on the meta device costs ~2 s of torch start-up, for nothing
            super().reset_parameters()

    def forward(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        rows = F.embedding(ids, self.weight).to(dtype)
        return torch.nan_to_num(rows) if is_fp8(self.weight) else rows  # as ComfyUI does for fp8 tables


class T5LayerNorm(nn.Module):
    """RMS norm: ``weight * x / sqrt(mean(x^2) + eps)``, the mean taken in fp32, the result in the input's dtype."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.to(x.dtype) * h.to(x.dtype)


def relative_position_bucket(rel: torch.Tensor, num_buckets: int = 32, max_distance: int = 128) -> torch.Tensor:
    """Bidirectional T5 buckets of ``rel = key_pos - query_pos``: half of the buckets per sign; in each half,
    distances below a quarter of ``num_buckets`` get a bucket each, larger ones share log-spaced buckets up to
    ``max_distance`` (and the last bucket beyond)."""
    half = num_buckets // 2
    exact = half // 2
    n = rel.abs()
    log_ratio = torch.log(n.clamp(min=1).float() / exact) / math.log(max_distance / exact)
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return (rel > 0).long() * half + torch.where(n < exact, n, far)


def _linear(cfg_in: int, cfg_out: int, fp8: Optional[torch.dtype]) -> nn.Module:
    return FP8Linear(cfg_in, cfg_out, fp8_dtype=fp8) if fp8 is not None else CastLinear(cfg_in, cfg_out)


def _fp16_clamp(x: torch.Tensor) -> torch.Tensor:
    # T5 activations can overflow fp16; clamp as Wan's and HF's T5 do (only when an inf appeared)
    if x.dtype != torch.float16:
        return x
    top = torch.finfo(x.dtype).max
    limit = torch.where(torch.isinf(x).any(), top - 1000, top)
    return torch.clamp(x, -limit, limit)


class UMT5Attention(nn.Module):
    """Self-attention with this layer's own relative position bias (no logit scaling)."""

    def __init__(self, cfg: UMT5Config, fp8: Optional[torch.dtype] = None):
        super().__init__()
        self.num_heads, self.cfg = cfg.num_heads, cfg
        self.q, self.k, self.v = (_linear(cfg.d_model, cfg.inner_dim, fp8) for _ in range(3))
        self.o = _linear(cfg.inner_dim, cfg.d_model, fp8)
        self.relative_attention_bias = CastEmbedding(cfg.num_buckets, cfg.num_heads)

    def position_bias(self, length: int, dtype: torch.dtype) -> torch.Tensor:
        """``[1, heads, L, L]`` bias of this layer."""
        pos = torch.arange(length, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(pos[None, :] - pos[:, None], self.cfg.num_buckets, self.cfg.max_distance)
        return rearrange(self.relative_attention_bias(buckets, dtype), "i j h -> 1 h i j")

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        q, k, v = (rearrange(f(x), "b l (h d) -> b h l d", h=self.num_heads) for f in (self.q, self.k, self.v))
        bias = self.position_bias(x.shape[1], x.dtype)
        if keep is not None:  # padded keys get the lowest value (Wan's masked_fill), so softmax gives them 0
            bias = bias.masked_fill(~keep[:, None, None, :], torch.finfo(x.dtype).min)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=1.0)
        return self.o(rearrange(out, "b h l d -> b l (h d)"))


class UMT5LayerSelfAttention(nn.Module):
    def __init__(self, cfg: UMT5Config, fp8: Optional[torch.dtype] = None):
        super().__init__()
        self.SelfAttention = UMT5Attention(cfg, fp8)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        return _fp16_clamp(x + self.SelfAttention(self.layer_norm(x), keep))


class UMT5GatedFF(nn.Module):
    """``wo(gelu_tanh(wi_0 x) * wi_1 x)``."""

    def __init__(self, cfg: UMT5Config, fp8: Optional[torch.dtype] = None):
        super().__init__()
        self.wi_0 = _linear(cfg.d_model, cfg.d_ff, fp8)
        self.wi_1 = _linear(cfg.d_model, cfg.d_ff, fp8)
        self.wo = _linear(cfg.d_ff, cfg.d_model, fp8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(F.gelu(self.wi_0(x), approximate="tanh") * self.wi_1(x))


class UMT5LayerFF(nn.Module):
    def __init__(self, cfg: UMT5Config, fp8: Optional[torch.dtype] = None):
        super().__init__()
        self.DenseReluDense = UMT5GatedFF(cfg, fp8)
        self.layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return _fp16_clamp(x + self.DenseReluDense(self.layer_norm(x)))


class UMT5Block(nn.Module):
    def __init__(self, cfg: UMT5Config, fp8: Optional[torch.dtype] = None):
        super().__init__()
        self.layer = nn.ModuleList([UMT5LayerSelfAttention(cfg, fp8), UMT5LayerFF(cfg, fp8)])

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, keep))


class UMT5Stack(nn.Module):
    def __init__(self, cfg: UMT5Config, fp8: Optional[torch.dtype] = None):
        super().__init__()
        self.block = nn.ModuleList([UMT5Block(cfg, fp8) for _ in range(cfg.num_layers)])
        self.final_layer_norm = T5LayerNorm(cfg.d_model, cfg.eps)

    def forward(self, x: torch.Tensor, keep: Optional[torch.Tensor]) -> torch.Tensor:
        for block in self.block:
            x = block(x, keep)
        return self.final_layer_norm(x)


class UMT5Encoder(nn.Module):
    """umT5 encoder: token ids ``[B, L]`` (+ padding mask) -> features ``[B, L, d_model]`` in ``compute_dtype``.

    ``fp8`` (a float8 dtype) makes every Linear an :class:`~omnisync_core.model.quant.FP8Linear` (float8 weight +
    ``scale_weight``) and adds the zero-element ``scaled_fp8`` marker: ComfyUI's scaled fp8 layout.
    ``compute_dtype`` is the dtype of the activations; weights are cast to it per call.
    """

    def __init__(self, config: "UMT5Config | str" = "umt5-xxl", fp8: Optional[torch.dtype] = None,
                 compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        cfg = UMT5_PRESETS[config] if isinstance(config, str) else config
        if fp8 is not None and fp8 not in FP8_DTYPES:
            raise ValueError(f"fp8 must be one of {FP8_DTYPES} or None, got {fp8}.")
        self.config, self.fp8, self.compute_dtype = cfg, fp8, compute_dtype
        self.shared = CastEmbedding(cfg.vocab_size, cfg.d_model)
        self.encoder = UMT5Stack(cfg, fp8)
        if fp8 is not None:
            self.register_buffer(SCALED_FP8_MARKER, torch.empty(0, dtype=fp8))

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.fp8 is not None:  # the marker names the float8 kind: .to(dtype) must not change it
            self._buffers[SCALED_FP8_MARKER] = self._buffers[SCALED_FP8_MARKER].to(self.fp8)
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``attention_mask`` ``[B, L]`` (1/True = token, 0/False = padding): padded keys are ignored; the rows of
        padded positions are computed but meaningless (Wan's convention keeps only the first ``len`` rows)."""
        keep = None if attention_mask is None else attention_mask.to(device=input_ids.device).bool()
        x = self.shared(input_ids, self.compute_dtype)
        return self.encoder(x, keep)


# ---------------------------------------------------------------- shapes and loading

def _shape(v) -> tuple:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(v)


def umt5_config_from_shapes(shapes: Mapping[str, object]) -> UMT5Config:
    """The :class:`UMT5Config` of a state dict given as ``name -> shape`` (tuples, tensors or ``TensorInfo``).

    Raises :class:`WeightsError` when the names are not those of a umT5 encoder (ComfyUI / Hugging Face layout),
    naming what the keys look like instead (T5 with one shared position bias, non-gated T5, another model).
    """
    if "shared.weight" not in shapes and "encoder.embed_tokens.weight" not in shapes:
        hint = " (they look like a Wan DiT or another model)" if shapes else ""
        raise WeightsError(f"These weights are not a umT5 text encoder: no shared.weight token embedding{hint}.")
    blocks = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.block\.(\d+)\.", k))})
    if not blocks or blocks != list(range(len(blocks))):
        raise WeightsError("These weights are not a umT5 text encoder: encoder.block.N layers are missing or have "
                           "gaps.")
    p = "encoder.block.0.layer."
    if f"{p}1.DenseReluDense.wi.weight" in shapes:
        raise WeightsError("These weights are a T5 v1.0 encoder (one non-gated wi FFN), not umT5.")
    need = {k: f"{p}{k}.weight" for k in ("0.SelfAttention.q", "0.SelfAttention.relative_attention_bias",
                                            "1.DenseReluDense.wi_0")}
    missing = [v for v in need.values() if v not in shapes]
    if missing:
        raise WeightsError(f"These weights are not a umT5 text encoder: {', '.join(missing)} missing.")
    if len(blocks) > 1 and "encoder.block.1.layer.0.SelfAttention.relative_attention_bias.weight" not in shapes:
        raise WeightsError("These weights are a T5 encoder (one position bias shared by all layers, in block 0), "
                           "not umT5 (a position bias in every layer).")
    vocab, d_model = _shape(shapes.get("shared.weight", shapes.get("encoder.embed_tokens.weight")))
    inner = _shape(shapes[need["0.SelfAttention.q"]])[0]
    buckets, heads = _shape(shapes[need["0.SelfAttention.relative_attention_bias"]])
    if inner % heads:
        raise WeightsError(f"These umT5 weights have {inner} attention channels for {heads} heads.")
    return UMT5Config(vocab_size=vocab, d_model=d_model, d_kv=inner // heads, num_heads=heads,
                      d_ff=_shape(shapes[need["1.DenseReluDense.wi_0"]])[0], num_layers=len(blocks),
                      num_buckets=buckets)


def umt5_expected_shapes(config: "UMT5Config | str" = "umt5-xxl", fp8: Optional[torch.dtype] = None
                         ) -> dict[str, tuple]:
    """``name -> shape`` of :class:`UMT5Encoder`'s state dict (built on the meta device: no memory)."""
    with torch.device("meta"):
        model = UMT5Encoder(config, fp8)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _is_linear_weight(name: str) -> bool:
    return name.startswith("encoder.block.") and name.endswith(".weight") and any(
        f".{lin}.weight" in name for lin in _LINEARS)


def _default_compute_dtype(device: torch.device) -> torch.dtype:
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_umt5(path, device=None, dtype=None, compute_dtype=None, progress: Optional[LoadProgress] = None
              ) -> tuple[UMT5Encoder, UMT5Tokenizer]:
    """Load a umT5 encoder and its tokenizer from a ComfyUI text-encoder file (eval mode, no grad).

    Layouts: ``umt5_xxl_fp16.safetensors`` (fp16 weights under Hugging Face/ComfyUI names: ``shared.weight``,
    ``encoder.block.N.layer.0.SelfAttention.{q,k,v,o,relative_attention_bias}``, ``...layer.1.DenseReluDense.
    {wi_0,wi_1,wo}``, the layer norms, ``encoder.final_layer_norm``) and ``umt5_xxl_fp8_e4m3fn_scaled.safetensors``
    (the same names; Linear weights float8 e4m3fn with a float32 ``<layer>.scale_weight``, and a ``scaled_fp8``
    marker; a float8 file without scales loads with scale 1, as ComfyUI does). Both embed the sentencepiece model
    as the uint8 tensor ``spiece_model``. ``scale_input`` tensors and a tied ``encoder.embed_tokens.weight`` copy
    are ignored (not read).

    ``device``: where the weights go (None: cpu; "auto" picks cuda/mps/cpu). ``dtype``: the dtype kept in memory
    for the non-float8 tensors (None or "auto": as stored). Float8 weights stay float8. ``compute_dtype``: the
    activations' dtype (None or "auto": bf16 on a CUDA GPU with bf16, else fp32); weights are cast to it layer by
    layer at each call.

    What it costs (umT5-XXL: 5.68 G parameters; 4.63 G in Linear layers, 1.05 G in the 256384 x 4096 embedding):
    - fp16 file, ``dtype`` None / fp16 / bf16: 5.68 G x 2 B = 11.4 GB; ``dtype=float32``: 22.7 GB (avoid on CPU).
    - fp8 scaled file: 4.63 G x 1 B + 1.05 G x 2 B (fp16 embedding) = 6.7 GB; the fp8 Linear weights are
      dequantised one layer at a time.
    - Loading streams tensor by tensor (:func:`iter_safetensors`): the peak is the model plus one tensor in flight
      (at most the 2.1 GB fp16 embedding, twice that if ``dtype`` casts it), never an fp32 copy of the model.
    - Running: one layer's weight cast to ``compute_dtype`` (4096 x 10240: 168 MB fp32, 84 MB bf16), plus the
      activations (512 tokens: FFN 512 x 10240 x 4 B = 21 MB per tensor; attention 64 x 512 x 512 x 4 B = 67 MB).
    """
    path = Path(path).expanduser()
    dev = torch.device("cpu") if device is None else resolve_device(device)
    keep_dtype = None if dtype in (None, "auto") else resolve_dtype(dtype, dev)
    compute = _default_compute_dtype(dev) if compute_dtype in (None, "auto") else resolve_dtype(compute_dtype, dev)
    header, _ = read_header(path)
    if SPIECE_KEY not in header:
        raise CheckpointError(f"{path.name} has no embedded tokenizer (the uint8 tensor {SPIECE_KEY!r} that "
                              f"ComfyUI's umt5 files carry), so it cannot encode text.")
    rename = {k: k for k in header if k != SPIECE_KEY and not _IGNORED.search(k)}
    if "shared.weight" not in header and "encoder.embed_tokens.weight" in header:
        rename["encoder.embed_tokens.weight"] = "shared.weight"  # Hugging Face's name for the same table
    weights = {new: header[old] for old, new in rename.items()}
    try:
        cfg = umt5_config_from_shapes(weights)
    except WeightsError as e:
        raise WeightsError(f"{path.name}: {e}") from None
    fp8 = _fp8_kind(weights, path.name)
    expected = umt5_expected_shapes(cfg, fp8)
    optional = tuple(k for k in expected if k.endswith(".scale_weight")) + (SCALED_FP8_MARKER,)
    shapes = {k: TensorInfo(v.dtype, () if k.endswith(".scale_weight") and math.prod(v.shape) == 1 else v.shape)
              for k, v in weights.items()}  # a scale may be stored as [1]
    report = validate_state_dict(shapes, expected, optional=optional)
    if not report.ok:
        raise CheckpointMismatchError(f"umT5 encoder ({path.name})", report)

    sd: dict[str, torch.Tensor] = {}
    spiece = None
    for i, (name, t) in enumerate(iter_safetensors(path, device=dev, keys=[*rename, SPIECE_KEY])):
        if name == SPIECE_KEY:
            spiece = t.cpu()
        else:
            sd[rename[name]] = _place(rename[name], t, keep_dtype)
        if progress is not None:
            progress("load-text-encoder", i + 1, len(rename) + 1)
    for k in optional:  # an fp8 Linear without a scale, or a file without the marker: ComfyUI's defaults
        if k in expected and k not in sd:
            sd[k] = (torch.empty(0, dtype=fp8, device=dev) if k == SCALED_FP8_MARKER
                     else torch.ones((), dtype=torch.float32, device=dev))
    with torch.device("meta"):
        model = UMT5Encoder(cfg, fp8, compute)
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().requires_grad_(False), UMT5Tokenizer.from_tensor(spiece)


def _fp8_kind(weights: Mapping[str, object], name: str) -> Optional[torch.dtype]:
    """The float8 dtype of the Linear weights (None for a 16/32-bit file); refuses a file that mixes kinds."""
    kinds = {getattr(v, "dtype", None) for k, v in weights.items() if _is_linear_weight(k)}
    fp8 = {_ST_FP8[d] for d in kinds if d in _ST_FP8}
    if len(fp8) > 1 or (fp8 and len(kinds) > 1):
        raise CheckpointError(f"{name} mixes Linear weight dtypes ({', '.join(sorted(map(str, kinds)))}); a umT5 "
                              f"file has all of them in float8 or none.")
    return next(iter(fp8), None)


def _place(name: str, t: torch.Tensor, keep_dtype: Optional[torch.dtype]) -> torch.Tensor:
    """One file tensor as the model keeps it: scales 0-d float32; float8 tensors (Linear weights, and any float8
    table) stay float8; other float tensors take ``keep_dtype`` if given."""
    if name.endswith(".scale_weight"):
        return t.float().reshape(())
    if is_fp8(t) or name == SCALED_FP8_MARKER:
        return t
    if keep_dtype is not None and t.is_floating_point() and t.dtype != keep_dtype:
        return t.to(keep_dtype)
    return t
