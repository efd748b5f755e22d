"""Whisper audio encoder (Radford et al. 2022) in plain PyTorch.

The module tree and state-dict keys follow openai/whisper's ``AudioEncoder`` (``conv1``, ``conv2``,
``positional_embedding``, ``blocks.N.{attn,attn_ln,mlp,mlp_ln}``, ``ln_post``), so its checkpoints load as
they are; Hugging Face ``transformers`` Whisper checkpoints load through :func:`convert_hf_whisper_encoder`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..errors import InputError

__all__ = [
    "WhisperEncoderConfig",
    "WHISPER_PRESETS",
    "WhisperEncoder",
    "WhisperWeightsError",
    "sinusoids",
    "convert_hf_whisper_encoder",
    "to_openai_whisper_encoder",
    "load_whisper_encoder_state_dict",
    "infer_whisper_config",
    "whisper_config_from_shapes",
    "whisper_preset_name",
    "whisper_encoder_keys",
    "whisper_encoder_from_state_dict",
    "load_whisper_encoder",
]


class WhisperWeightsError(InputError):
    """A Whisper encoder state dict does not fit the model (missing, unexpected or mis-shaped keys)."""


@dataclass(frozen=True)
class WhisperEncoderConfig:
    """Shape of a Whisper encoder; ``n_ctx`` is the number of output frames for 30 s (1500 = 3000 mel / 2)."""

    n_mels: int = 80
    n_ctx: int = 1500
    d_model: int = 384
    n_heads: int = 6
    n_layers: int = 4


WHISPER_PRESETS: dict[str, WhisperEncoderConfig] = {
    "tiny": WhisperEncoderConfig(d_model=384, n_heads=6, n_layers=4),
    "tiny.en": WhisperEncoderConfig(d_model=384, n_heads=6, n_layers=4),
    "base": WhisperEncoderConfig(d_model=512, n_heads=8, n_layers=6),
    "base.en": WhisperEncoderConfig(d_model=512, n_heads=8, n_layers=6),
    "small": WhisperEncoderConfig(d_model=768, n_heads=12, n_layers=12),
    "small.en": WhisperEncoderConfig(d_model=768, n_heads=12, n_layers=12),
    "medium": WhisperEncoderConfig(d_model=1024, n_heads=16, n_layers=24),
    "medium.en": WhisperEncoderConfig(d_model=1024, n_heads=16, n_layers=24),
    "large-v2": WhisperEncoderConfig(d_model=1280, n_heads=20, n_layers=32),
    "large-v3": WhisperEncoderConfig(n_mels=128, d_model=1280, n_heads=20, n_layers=32),
}


def sinusoids(length: int, channels: int, max_timescale: float = 10000.0) -> torch.Tensor:
    """Whisper's fixed positional embedding: [length, channels], sines in the first half, cosines in the second."""
    if channels % 2:
        raise InputError(f"The Whisper positional embedding needs an even width, got {channels}.")
    half = channels // 2
    step = math.log(max_timescale) / (half - 1)
    inv_timescales = torch.exp(-step * torch.arange(half, dtype=torch.float64))
    angles = torch.arange(length, dtype=torch.float64)[:, None] * inv_timescales[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in float32 whatever the weight/input dtype (as openai/whisper does)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


class MultiHeadAttention(nn.Module):
    """Bidirectional self-attention; ``key`` has no bias (a key bias cannot change the softmax)."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.n_heads = n_heads
        self.query = nn.Linear(d_model, d_model)
        self.key = nn.Linear(d_model, d_model, bias=False)
        self.value = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.attend(x, *self.keys_values(x))

    def keys_values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(rearrange(p(x), "b t (h d) -> b h t d", h=self.n_heads) for p in (self.key, self.value))

    def attend(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """The attention output of the queries of ``x`` (any run of tokens) over keys and values of the whole window."""
        q = rearrange(self.query(x), "b t (h d) -> b h t d", h=self.n_heads)
        return self.out(rearrange(F.scaled_dot_product_attention(q, k, v), "b h t d -> b t (h d)"))


BLOCK_TOKENS = 256


class ResidualAttentionBlock(nn.Module):
    """Pre-LN transformer block: x + attn(ln(x)), then x + mlp(ln(x)) with a 4x GELU MLP."""

    def __init__(self, d_model: int, n_heads: int):
        super().__init__()
        self.attn = MultiHeadAttention(d_model, n_heads)
        self.attn_ln = LayerNorm(d_model)
        self.mlp = nn.Sequential(nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model))
        self.mlp_ln = LayerNorm(d_model)

    def forward(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The block's output, written into ``out`` (a new tensor by default). ``out`` may be ``x`` itself when no
        graph is recorded: a token block's output depends on its own rows of ``x`` and the keys and values only."""
        # everything but the keys and values is per token, so it runs on blocks of tokens: a 30 s window's queries,
        # attention output, MLP activations (4 d_model wide) and sums are never alive whole, only x, k, v and out are
        k, v = self.attn.keys_values(self.attn_ln(x))
        out = torch.empty_like(x) if out is None else out
        for a in range(0, x.shape[1], BLOCK_TOKENS):
            rows = slice(a, a + BLOCK_TOKENS)
            out[:, rows] = self._tokens(x[:, rows], k, v)
        return out

    def _tokens(self, x: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        x = x + self.attn.attend(self.attn_ln(x), k, v)
        return x + self.mlp(self.mlp_ln(x))


class WhisperEncoder(nn.Module):
    """Whisper audio encoder: log-mel [B, n_mels, T] (T <= 2 * n_ctx) -> features [B, ceil(T / 2), d_model]."""

    def __init__(self, config: WhisperEncoderConfig | str = WhisperEncoderConfig()):
        super().__init__()
        if isinstance(config, str):
            if config not in WHISPER_PRESETS:
                raise InputError(f"Unknown Whisper preset {config!r}; choose one of {', '.join(WHISPER_PRESETS)}.")
            config = WHISPER_PRESETS[config]
        if config.d_model % config.n_heads:
            raise InputError(f"Whisper d_model {config.d_model} is not divisible by n_heads {config.n_heads}.")
        self.config = config
        d = config.d_model
        self.conv1 = nn.Conv1d(config.n_mels, d, kernel_size=3, padding=1)
        self.conv2 = nn.Conv1d(d, d, kernel_size=3, stride=2, padding=1)
        self.register_buffer("positional_embedding", sinusoids(config.n_ctx, d))
        self.blocks = nn.ModuleList(ResidualAttentionBlock(d, config.n_heads) for _ in range(config.n_layers))
        self.ln_post = LayerNorm(d)

    def embed(self, mel: torch.Tensor, block: int = 256) -> torch.Tensor:
        """``gelu(conv2(gelu(conv1(mel))))`` ``[B, d_model, ceil(T / 2)]``, computed ``block`` output tokens at a time:
        a token reads mel frames ``2j - 2 .. 2j + 2`` only, so the blocks (each given its 2-frame margins, zeros
        outside the clip as the convolutions' padding) give the same tokens while the 30 s window's conv1 output
        (``d_model x 3000`` floats, with its GELU and im2col copies) is never held whole."""
        frames, tokens = mel.shape[-1], -(-mel.shape[-1] // 2)
        out = None   # [B, tokens, d_model], filled block by block; returned as a [B, d_model, tokens] view
        for j0 in range(0, tokens, block):
            j1 = min(j0 + block, tokens)
            a, b = 2 * j0 - 1, min(2 * j1, frames)               # conv1 outputs the block needs (a may be -1)
            lo, hi = max(a - 1, 0), min(b + 1, frames)
            piece = F.pad(mel[..., lo:hi], (lo - (a - 1), (b + 1) - hi))
            h = F.gelu(F.conv1d(piece, self.conv1.weight, self.conv1.bias))      # conv1 outputs a .. b - 1
            if a < 0:
                h[..., 0] = 0                                      # conv2's zero padding, not gelu(conv1(0))
            h = F.pad(h, (0, 2 * j1 - b))                          # conv2's padding past the end
            h = F.gelu(F.conv1d(h, self.conv2.weight, self.conv2.bias, stride=2))
            if out is None:
                out = h.new_empty(h.shape[0], tokens, h.shape[1])
            out[:, j0:j1] = h.transpose(1, 2)
        return out.transpose(1, 2)

    def forward(
        self, mel: torch.Tensor, output_hidden_states: bool = False,
        layer_groups: Sequence[tuple[int, int]] | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, ...]:
        """Encode log-mel frames.

        Returns the final (``ln_post``-normalised) features ``[B, T, d_model]``; with ``output_hidden_states`` also
        ``[output of block 0, ..., output of block n_layers - 1]`` (block outputs are not normalised); with
        ``layer_groups`` also ``[B, T, len(layer_groups), d_model]`` float32, the mean of each group of Hugging Face
        hidden states (``(start, stop)``, stop exclusive), kept as running sums so that the states themselves are
        never held. In HF's numbering (``WhisperEncoder(..., output_hidden_states=True).hidden_states``) entry 0 is
        the conv + position output (the input of block 0), entry i the output of block i - 1 for
        ``1 <= i < n_layers``, and entry ``n_layers`` the final normalised output. The extras come in that order:
        ``(final, hidden)``, ``(final, groups)`` or ``(final, hidden, groups)``.
        """
        cfg = self.config
        if mel.ndim != 3 or mel.shape[1] != cfg.n_mels:
            raise InputError(f"Whisper expects log-mel of shape [batch, {cfg.n_mels}, frames], got {list(mel.shape)}.")
        if not 0 < mel.shape[-1] <= 2 * cfg.n_ctx:
            raise InputError(f"Whisper takes 1 to {2 * cfg.n_ctx} mel frames per chunk, got {mel.shape[-1]}.")
        groups = _check_groups(layer_groups, cfg.n_layers)
        x = self.embed(mel.to(self.conv1.weight.dtype)).transpose(1, 2)
        x = x.add_(self.positional_embedding[: x.shape[1]].to(x.dtype))
        sums: list[torch.Tensor | None] = [None] * len(groups)
        _accumulate(sums, groups, 0, x)
        hidden = []
        in_place = not (output_hidden_states or torch.is_grad_enabled())   # nothing else holds x: overwrite it
        for index, block in enumerate(self.blocks, start=1):
            x = block(x, out=x if in_place else None)
            if output_hidden_states:
                hidden.append(x)
            if index < cfg.n_layers:   # HF's entry n_layers is the normalised output, not the raw last block
                _accumulate(sums, groups, index, x)
        x = self.ln_post(x)
        _accumulate(sums, groups, cfg.n_layers, x)
        extras: list = [hidden] if output_hidden_states else []
        if layer_groups is not None:
            extras.append(torch.stack([s / (stop - start) for s, (start, stop) in zip(sums, groups)], dim=2))
        return (x, *extras) if extras else x


def _check_groups(layer_groups: Sequence[tuple[int, int]] | None, n_layers: int) -> list[tuple[int, int]]:
    groups = [(int(a), int(b)) for a, b in (layer_groups or ())]
    if layer_groups is not None and not groups:
        raise InputError("layer_groups must name at least one (start, stop) range of hidden states.")
    for start, stop in groups:
        if not 0 <= start < stop <= n_layers + 1:
            raise InputError(f"A Whisper layer group must satisfy 0 <= start < stop <= {n_layers + 1} "
                             f"(there are {n_layers + 1} hidden states), got ({start}, {stop}).")
    return groups


def _accumulate(sums: list, groups: list[tuple[int, int]], index: int, x: torch.Tensor) -> None:
    """Add hidden state ``index`` (HF numbering) to the running float32 sum of every group that holds it."""
    for g, (start, stop) in enumerate(groups):
        if start <= index < stop:
            sums[g] = x.to(torch.float32, copy=True) if sums[g] is None else sums[g].add_(x)


# --- state-dict layouts -------------------------------------------------------------------------

_HF_LAYER_RENAMES = {
    "self_attn.q_proj": "attn.query",
    "self_attn.k_proj": "attn.key",
    "self_attn.v_proj": "attn.value",
    "self_attn.out_proj": "attn.out",
    "self_attn_layer_norm": "attn_ln",
    "fc1": "mlp.0",
    "fc2": "mlp.2",
    "final_layer_norm": "mlp_ln",
}
_HF_TOP_RENAMES = {"embed_positions.weight": "positional_embedding", "layer_norm.weight": "ln_post.weight",
                   "layer_norm.bias": "ln_post.bias"}
_HF_LAYER_KEY = re.compile(r"layers\.(\d+)\.(.+)\.(weight|bias)$")


_ENCODER_PREFIXES = ("model.encoder.", "encoder.")


def _encoder_prefix(names) -> str:
    """The prefix of a full model's encoder entries (HF ``model.encoder.``, openai/bare ``encoder.``), else ''."""
    names = list(names)
    return next((p for p in _ENCODER_PREFIXES if any(k.startswith(p) for k in names)), "")


def whisper_encoder_keys(names) -> list[str]:
    """The names of a checkpoint's tensors that belong to the encoder: those under ``model.encoder.`` or
    ``encoder.`` when the file holds a whole model (decoder, ``proj_out`` left out), else every name. Pass it to
    ``iter_safetensors(..., keys=...)`` so that a full Whisper's decoder is never read."""
    names = list(names)
    prefix = _encoder_prefix(names)
    return [k for k in names if k.startswith(prefix)]


def _encoder_part(state_dict: Mapping[str, torch.Tensor], prefixes: tuple[str, ...] = _ENCODER_PREFIXES
                  ) -> dict[str, torch.Tensor]:
    """Keep only the encoder's entries of a full-model state dict, with the encoder prefix stripped."""
    for prefix in prefixes:
        if any(k.startswith(prefix) for k in state_dict):
            return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _layout(state_dict: Mapping[str, torch.Tensor]) -> str:
    keys = list(state_dict)
    if any(".self_attn." in k or "embed_positions" in k or re.search(r"(^|\.)layers\.\d+\.", k) for k in keys):
        return "hf"
    return "openai"


def convert_hf_whisper_encoder(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map a transformers ``WhisperEncoder`` / ``WhisperModel`` / ``WhisperForConditionalGeneration`` state dict
    to our (openai/whisper) encoder layout; decoder entries are dropped, unknown encoder keys are kept as they are
    so that loading reports them."""
    sd = _encoder_part(state_dict, ("model.encoder.", "encoder."))
    out = {}
    for key, value in sd.items():
        match = _HF_LAYER_KEY.match(key)
        if key in _HF_TOP_RENAMES:
            key = _HF_TOP_RENAMES[key]
        elif match and match.group(2) in _HF_LAYER_RENAMES:
            key = f"blocks.{match.group(1)}.{_HF_LAYER_RENAMES[match.group(2)]}.{match.group(3)}"
        out[key] = value
    return out


def to_openai_whisper_encoder(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Normalise an openai-layout (optionally ``encoder.``-prefixed) or Hugging Face state dict to our layout."""
    if _layout(state_dict) == "hf":
        return convert_hf_whisper_encoder(state_dict)
    return _encoder_part(state_dict, ("model.encoder.", "encoder."))


def load_whisper_encoder_state_dict(
    model: WhisperEncoder, state_dict: Mapping[str, torch.Tensor]
) -> WhisperEncoder:
    """Load openai/whisper or Hugging Face encoder weights strictly into ``model`` (in place; returns it).

    ``positional_embedding`` may be absent: it is fixed (sinusoids) and the computed one is kept.
    Raises :class:`WhisperWeightsError` naming every missing, unexpected and mis-shaped key.
    """
    sd = to_openai_whisper_encoder(state_dict)
    own = model.state_dict()
    sd.setdefault("positional_embedding", own["positional_embedding"])
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    mismatched = [f"{k} {list(sd[k].shape)} vs model {list(own[k].shape)}"
                  for k in sorted(set(sd) & set(own)) if sd[k].shape != own[k].shape]
    if missing or unexpected or mismatched:
        parts = [f"{label}: {', '.join(items[:8])}{' ...' if len(items) > 8 else ''}"
                 for label, items in (("missing", missing), ("unexpected", unexpected), ("wrong shape", mismatched))
                 if items]
        raise WhisperWeightsError(f"Whisper encoder weights do not fit the {model.config} model ({'; '.join(parts)}).")
    model.load_state_dict(sd, strict=True)
    return model


def whisper_config_from_shapes(
    shapes: Mapping[str, object], n_heads: int | None = None, head_dim: int = 64
) -> WhisperEncoderConfig:
    """The encoder shape from a checkpoint's ``name -> shape`` (tuples, tensors, or ``TensorInfo`` from
    ``read_header``), either layout, whole model or encoder only: ``n_mels`` and ``d_model`` from ``conv1``, the
    layer count from the block indices, ``n_ctx`` from the positions if stored.

    The head count is not visible in the shapes; every released Whisper uses 64-wide heads, hence
    ``n_heads = d_model // head_dim`` unless ``n_heads`` is given. Comfy-Org's ``whisper_large_v3_fp16`` gives
    ``WHISPER_PRESETS["large-v3"]`` (128 mels, 1280 wide, 32 layers); :func:`whisper_preset_name` names it.
    """
    sd = to_openai_whisper_encoder({k: tuple(getattr(v, "shape", v)) for k, v in shapes.items()})
    if "conv1.weight" not in sd:
        raise WhisperWeightsError("This checkpoint holds no Whisper encoder (no conv1.weight key).")
    d_model, n_mels = sd["conv1.weight"][:2]
    blocks = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    n_ctx = sd["positional_embedding"][0] if "positional_embedding" in sd else 1500
    return WhisperEncoderConfig(n_mels=int(n_mels), n_ctx=int(n_ctx), d_model=int(d_model),
                                n_heads=n_heads or max(1, int(d_model) // head_dim), n_layers=len(blocks))


def whisper_preset_name(config: WhisperEncoderConfig) -> str | None:
    """The released model a config has the shape of ("tiny", ..., "large-v2", "large-v3"), or None.
    Shapes cannot tell ``tiny`` from ``tiny.en`` (nor large v1 from v2): the multilingual name is given."""
    return next((name for name, preset in WHISPER_PRESETS.items()
                 if preset == config and not name.endswith(".en")), None)


def infer_whisper_config(
    state_dict: Mapping[str, torch.Tensor], n_heads: int | None = None, head_dim: int = 64
) -> WhisperEncoderConfig:
    """Read the encoder shape from a state dict (either layout); see :func:`whisper_config_from_shapes`."""
    return whisper_config_from_shapes(state_dict, n_heads=n_heads, head_dim=head_dim)


def whisper_encoder_from_state_dict(
    state_dict: Mapping[str, torch.Tensor], n_heads: int | None = None, dtype: torch.dtype | None = None
) -> WhisperEncoder:
    """Build a :class:`WhisperEncoder` shaped after ``state_dict`` and load it (eval mode)."""
    config = infer_whisper_config(state_dict, n_heads=n_heads)
    model = load_whisper_encoder_state_dict(WhisperEncoder(config), state_dict).eval()
    return model.to(dtype) if dtype is not None else model


def load_whisper_encoder(path: str, n_heads: int | None = None, dtype: torch.dtype | None = None) -> WhisperEncoder:
    """Load a Whisper encoder from a ``.safetensors`` file in openai or Hugging Face layout; of a whole model
    (Comfy-Org's ``whisper_large_v3_fp16``) only the encoder's tensors are read."""
    from ..model.loading import iter_safetensors, read_header   # loading imports this module

    if not str(path).endswith(".safetensors"):
        raise InputError(f"Whisper weights must be a .safetensors file, got {path}.")
    keys = whisper_encoder_keys(read_header(path)[0])
    return whisper_encoder_from_state_dict(dict(iter_safetensors(path, keys=keys)), n_heads=n_heads, dtype=dtype)
