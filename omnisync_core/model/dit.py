"""OmniSync Diffusion Transformer: Wan2.1 T2V backbone + frame-local audio cross-attention + source latents.

State-dict keys follow the original Wan2.1 layout (wan/modules/model.py), so Wan2.1 T2V checkpoints
initialise the backbone directly. New keys: `audio_embedding.{0,2}`, `blocks.N.audio_norm`,
`blocks.N.audio_attn.{q,k,v,o,norm_q,norm_k}`, the 16 source input channels of `patch_embedding.weight`
(columns 16..31), and the optional `text_context` buffer (the encoded fixed prompt).

Numerics follow Wan: the residual stream, norms, modulation and time embedding are fp32; the linear
layers run in their weight dtype or under autocast.
"""

from dataclasses import asdict, dataclass, fields, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange
from torch.utils.checkpoint import checkpoint

from ..errors import InputError
from .rope import rope_apply, rope_freqs
from .wan_keys import normalize_wan_state_dict


class WeightsError(InputError):
    """A state dict does not fit the model (missing, unexpected or mis-shaped tensors)."""


# What the network's head predicts. "velocity": v = eps - x0 (Wan2.1; every Wan-initialised preset).
# "source-residual" (ours, for small models trained from scratch): x0 - z_src, the edit the source needs; forward()
# still returns the implied velocity (x - x0) / sigma, so samplers and guidance are the same for both. The head
# then only has to describe the mouth change, not pass per-pixel noise through a token narrower than its patch.
PREDICTIONS = ("velocity", "source-residual")
MIN_SIGMA = 1e-4          # the source-residual velocity divides by sigma (clamped to this)


@dataclass
class DiTConfig:
    """Hyper-parameters of OmniSyncDiT (Wan2.1 names). `audio_window` is the number of audio tokens per
    video frame the audio stage produces (it is not enforced: attention works for any count)."""

    dim: int = 1536
    ffn_dim: int = 8960
    num_heads: int = 12
    num_layers: int = 30
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple = (1, 2, 2)
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    audio_dim: int = 384
    audio_window: int = 5
    eps: float = 1e-6
    qk_norm: bool = True
    cross_attn_norm: bool = True
    source_concat: bool = True
    enable_audio: bool = True
    temporal_compression: int = 4
    prediction: str = "velocity"

    def __post_init__(self):
        self.patch_size = tuple(int(p) for p in self.patch_size)
        if self.dim % self.num_heads or (self.dim // self.num_heads) % 2:
            raise InputError(f"dim {self.dim} must split into {self.num_heads} heads of even size.")
        if self.prediction not in PREDICTIONS:
            raise InputError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}.")

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @property
    def patch_in_dim(self) -> int:
        """Input channels of the patch embedding: latent (+ source latent when source_concat)."""
        return self.in_dim * (2 if self.source_concat else 1)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["patch_size"] = list(self.patch_size)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        """Build from a dict (e.g. checkpoint metadata); unknown keys are an error."""
        names = {f.name for f in fields(cls)}
        extra = sorted(set(d) - names)
        if extra:
            raise InputError(f"Unknown DiT config fields: {', '.join(extra)}.")
        return cls(**d)


DIT_PRESETS = {
    "tiny": DiTConfig(dim=64, ffn_dim=128, num_heads=2, num_layers=2, text_dim=32, text_len=16, audio_window=4),
    "wan2.1-1.3b": DiTConfig(dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan2.1-14b": DiTConfig(dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}


def get_config(preset: "str | DiTConfig", **overrides) -> DiTConfig:
    """A copy of a preset (by name) or of a config, with field overrides."""
    if isinstance(preset, str):
        if preset not in DIT_PRESETS:
            raise InputError(f"Unknown DiT preset {preset!r}; choose one of {', '.join(DIT_PRESETS)}.")
        preset = DIT_PRESETS[preset]
    return replace(preset, **overrides)


# ---------------------------------------------------------------- layers

class RMSNorm(nn.Module):
    """RMSNorm over the last dim, fp32 math, output in the input dtype (Wan's WanRMSNorm)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        y = x.float()
        y = y * torch.rsqrt(y.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class LayerNorm(nn.LayerNorm):
    """LayerNorm computed in fp32 with an fp32 output (the residual stream is fp32)."""

    def forward(self, x):
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps)


class Attention(nn.Module):
    """Multi-head (self or cross) attention with Wan's q/k RMSNorm over the full dim; SDPA kernel.
    `context_dim` is the width of the k/v input (default: dim)."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, eps: float, context_dim: "int | None" = None):
        super().__init__()
        self.num_heads = num_heads
        kv = context_dim or dim
        self.q, self.k, self.v, self.o = (nn.Linear(i, dim) for i in (dim, kv, kv, dim))
        self.norm_q = RMSNorm(dim, eps) if qk_norm else nn.Identity()
        self.norm_k = RMSNorm(dim, eps) if qk_norm else nn.Identity()

    def forward(self, x, context=None, freqs=None):
        dt = self.q.weight.dtype
        x = x.to(dt)
        context = x if context is None else context.to(dt)
        split = lambda t: rearrange(t, "b l (n d) -> b n l d", n=self.num_heads)
        q = split(self.norm_q(self.q(x)))
        k = split(self.norm_k(self.k(context)))
        v = split(self.v(context))
        if freqs is not None:
            q, k = rope_apply(q, freqs), rope_apply(k, freqs)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.o(rearrange(y, "b n l d -> b l (n d)"))


class DiTBlock(nn.Module):
    """Wan2.1 attention block with a frame-local audio cross-attention inserted after self-attention."""

    def __init__(self, c: DiTConfig):
        super().__init__()
        self.norm1 = LayerNorm(c.dim, c.eps, elementwise_affine=False)
        self.self_attn = Attention(c.dim, c.num_heads, c.qk_norm, c.eps)
        if c.enable_audio:
            self.audio_norm = LayerNorm(c.dim, c.eps, elementwise_affine=True)
            self.audio_attn = Attention(c.dim, c.num_heads, c.qk_norm, c.eps)
        self.norm3 = LayerNorm(c.dim, c.eps, elementwise_affine=True) if c.cross_attn_norm else nn.Identity()
        self.cross_attn = Attention(c.dim, c.num_heads, c.qk_norm, c.eps)
        self.norm2 = LayerNorm(c.dim, c.eps, elementwise_affine=False)
        self.ffn = nn.Sequential(nn.Linear(c.dim, c.ffn_dim), nn.GELU(approximate="tanh"), nn.Linear(c.ffn_dim, c.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, c.dim) / c.dim**0.5)

    def forward(self, x, e, freqs, context, audio=None, audio_gate=None, frames: int = 1):
        """x [B, L, C] fp32; e [B, 6, C] fp32; audio [B*frames, K, C] keys of each latent frame or None."""
        shift1, scale1, gate1, shift2, scale2, gate2 = (self.modulation.float() + e).unsqueeze(2).unbind(1)
        y = self.self_attn(self.norm1(x) * (1 + scale1) + shift1, freqs=freqs)
        x = x + y.float() * gate1
        if audio is not None and hasattr(self, "audio_attn"):
            # frame-local: each latent frame's tokens are a separate query batch over its own audio keys
            q = rearrange(self.audio_norm(x), "b (f s) c -> (b f) s c", f=frames)
            y = rearrange(self.audio_attn(q, audio), "(b f) s c -> b (f s) c", f=frames).float()
            x = x + (y if audio_gate is None else y * audio_gate)
        x = x + self.cross_attn(self.norm3(x), context).float()
        y = self.ffn((self.norm2(x) * (1 + scale2) + shift2).to(self.ffn[0].weight.dtype))
        return x + y.float() * gate2


class Head(nn.Module):
    """Output head: AdaLN (2 chunks from the time embedding) + linear to patch pixels."""

    def __init__(self, c: DiTConfig):
        super().__init__()
        self.norm = LayerNorm(c.dim, c.eps, elementwise_affine=False)
        self.head = nn.Linear(c.dim, c.out_dim * c.patch_size[0] * c.patch_size[1] * c.patch_size[2])
        self.modulation = nn.Parameter(torch.randn(1, 2, c.dim) / c.dim**0.5)

    def forward(self, x, e):
        shift, scale = (self.modulation.float() + e[:, None]).unsqueeze(2).unbind(1)
        return self.head((self.norm(x) * (1 + scale) + shift).to(self.head.weight.dtype))


def sinusoidal_embedding(dim: int, t: torch.Tensor) -> torch.Tensor:
    """Wan's timestep embedding [cos | sin] with frequencies 10000^(-i/half), float64 math: [B, dim]."""
    dt = torch.float32 if t.device.type == "mps" else torch.float64
    half = dim // 2
    args = torch.outer(t.to(dt), 10000.0 ** (-torch.arange(half, device=t.device, dtype=dt) / half))
    return torch.cat([args.cos(), args.sin()], dim=1)


def latent_audio_index(num_latent_frames: int, stride: int = 4, device=None) -> torch.Tensor:
    """Video frames covered by each latent frame under Wan's causal temporal compression: [T, stride].

    Latent 0 covers video frame 0 only; its row repeats frame 0 so every latent frame gets the same
    number of audio keys (stride * A). Latent f >= 1 covers video frames stride*(f-1)+1 .. stride*f.
    """
    f = torch.arange(num_latent_frames, device=device)[:, None]
    idx = stride * (f - 1) + 1 + torch.arange(stride, device=device)
    return idx.clamp_min(0)


def video_frames_for(num_latent_frames: int, stride: int = 4) -> int:
    """Number of video frames that a clip of `num_latent_frames` latent frames encodes."""
    return stride * (num_latent_frames - 1) + 1


# ---------------------------------------------------------------- model

class OmniSyncDiT(nn.Module):
    """Wan2.1 T2V DiT with frame-local audio cross-attention and channel-concatenated source latents.

    With `audio=None` and `source=None` (or `enable_audio=False, source_concat=False`) it computes
    exactly Wan2.1 T2V. `gradient_checkpointing = True` checkpoints every block while training.
    """

    _NEW_PREFIXES = ("audio_embedding.",)
    _NEW_BLOCK_PARTS = (".audio_attn.", ".audio_norm.")

    def __init__(self, config: DiTConfig):
        super().__init__()
        c = self.config = config
        self.patch_embedding = nn.Conv3d(c.patch_in_dim, c.dim, kernel_size=c.patch_size, stride=c.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(c.text_dim, c.dim), nn.GELU(approximate="tanh"),
                                            nn.Linear(c.dim, c.dim))
        self.time_embedding = nn.Sequential(nn.Linear(c.freq_dim, c.dim), nn.SiLU(), nn.Linear(c.dim, c.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(c.dim, c.dim * 6))
        if c.enable_audio:
            self.audio_embedding = nn.Sequential(nn.Linear(c.audio_dim, c.dim), nn.GELU(approximate="tanh"),
                                                 nn.Linear(c.dim, c.dim))
        self.blocks = nn.ModuleList(DiTBlock(c) for _ in range(c.num_layers))
        self.head = Head(c)
        self.register_buffer("text_context", None, persistent=True)
        self.gradient_checkpointing = False
        self.init_weights()

    # ------------------------------------------------------------ init / loading

    def init_weights(self):
        """Wan's init (xavier linears, N(0, .02) embeddings, zero head) plus the zero-init new parameters."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.patch_embedding.weight.flatten(1))
        for seq in (self.text_embedding, self.time_embedding):
            for m in seq:
                if isinstance(m, nn.Linear):
                    nn.init.normal_(m.weight, std=0.02)
        nn.init.zeros_(self.head.head.weight)
        self.init_new_weights()

    @torch.no_grad()
    def init_new_weights(self):
        """(Re)initialise only the OmniSync additions so that the model equals its Wan base."""
        if self.config.source_concat:
            self.patch_embedding.weight[:, self.config.in_dim:].zero_()
        if not self.config.enable_audio:
            return
        for m in self.audio_embedding:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        for blk in self.blocks:
            blk.audio_norm.reset_parameters()
            for lin in (blk.audio_attn.q, blk.audio_attn.k, blk.audio_attn.v):
                nn.init.xavier_uniform_(lin.weight)
                nn.init.zeros_(lin.bias)
            for norm in (blk.audio_attn.norm_q, blk.audio_attn.norm_k):
                if isinstance(norm, RMSNorm):
                    nn.init.ones_(norm.weight)
            nn.init.zeros_(blk.audio_attn.o.weight)
            nn.init.zeros_(blk.audio_attn.o.bias)

    @classmethod
    def is_new_key(cls, key: str) -> bool:
        """True for state-dict keys that Wan2.1 T2V checkpoints do not have."""
        return key.startswith(cls._NEW_PREFIXES) or any(p in key for p in cls._NEW_BLOCK_PARTS)

    def set_text_context(self, context: "torch.Tensor | None"):
        """Store the encoded fixed prompt [1, L, text_dim] (used when forward gets text=None)."""
        if context is not None:
            if context.ndim == 2:
                context = context[None]
            if context.ndim != 3 or context.shape[0] != 1 or context.shape[-1] != self.config.text_dim:
                raise InputError(f"text_context must be [1, L, {self.config.text_dim}], got {tuple(context.shape)}.")
            context = context.to(self.patch_embedding.weight.device)
        self.text_context = context

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors):
        # a None buffer is skipped by nn.Module; give it a placeholder of the stored shape so it loads
        t = state_dict.get(prefix + "text_context")
        if t is not None and (self.text_context is None or self.text_context.shape != t.shape):
            self.text_context = torch.empty(t.shape, dtype=t.dtype, device=self.patch_embedding.weight.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)

    @classmethod
    def from_wan_state_dict(cls, state_dict: dict, config: DiTConfig, device=None, dtype=None) -> "OmniSyncDiT":
        """Build from a Wan2.1 T2V state dict (original or diffusers names, optional ComfyUI prefix).

        Every backbone tensor must be present with the right shape and nothing else may be (strict);
        the OmniSync additions are freshly initialised so the result equals the Wan base. Built on the
        meta device, so only the new parameters are allocated besides the given tensors.
        """
        sd = normalize_wan_state_dict(state_dict)
        ref = next(iter(sd.values()))
        device = torch.device(device) if device is not None else ref.device
        dtype = dtype or ref.dtype
        with torch.device("meta"):
            model = cls(config)
        expected = model.state_dict()
        base = {k for k in expected if not cls.is_new_key(k)}
        missing = sorted(base - set(sd))
        unexpected = sorted(set(sd) - base - {"text_context"})
        if missing or unexpected:
            raise WeightsError(_key_report(missing, unexpected))
        pw = sd["patch_embedding.weight"]
        want = (config.dim, config.in_dim, *config.patch_size)
        if tuple(pw.shape) != want:
            raise WeightsError(f"patch_embedding.weight is {tuple(pw.shape)}, the Wan base needs {want}.")
        # materialise and initialise the new parts only
        new_mods = [model.patch_embedding] + [m for n, m in model.named_children() if n == "audio_embedding"]
        new_mods += [getattr(b, n) for b in model.blocks for n in ("audio_attn", "audio_norm") if hasattr(b, n)]
        for m in new_mods:
            m.to_empty(device=device)
        model.init_new_weights()
        full = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
        with torch.no_grad():
            full["patch_embedding.weight"] = torch.cat(
                [full["patch_embedding.weight"], model.patch_embedding.weight[:, config.in_dim:].to(dtype)], 1
            ) if config.source_concat else full["patch_embedding.weight"]
            for k, v in model.state_dict().items():
                if cls.is_new_key(k):
                    full[k] = v.to(dtype)
        model.load_checked(full, assign=True)
        return model

    def load_checked(self, state_dict: dict, assign: bool = False):
        """Strict load_state_dict that raises WeightsError with a readable key/shape report."""
        expected = self.state_dict()
        bad = [f"{k}: {tuple(v.shape)} != {tuple(expected[k].shape)}" for k, v in state_dict.items()
               if k in expected and tuple(v.shape) != tuple(expected[k].shape)]
        missing = sorted(set(expected) - set(state_dict))
        unexpected = sorted(set(state_dict) - set(expected) - {"text_context"})
        if bad or missing or unexpected:
            raise WeightsError(_key_report(missing, unexpected, bad))
        self.load_state_dict(state_dict, strict=True, assign=assign)

    # ------------------------------------------------------------ forward

    def embed_time(self, sigma: torch.Tensor):
        """sigma [B] in [0, 1] -> (e [B, dim], e0 [B, 6, dim]) in fp32, timestep = 1000 * sigma as Wan."""
        lin = self.time_embedding[0].weight
        with torch.autocast(device_type=lin.device.type, enabled=False):
            s = sinusoidal_embedding(self.config.freq_dim, sigma * 1000.0).to(lin.dtype)
            e = self.time_embedding(s).float()
            e0 = self.time_projection(e.to(lin.dtype)).float().unflatten(1, (6, self.config.dim))
        return e, e0

    def embed_text(self, text, batch: int):
        """Project T5 features [B, L, text_dim] (zero-padded to text_len as Wan) to [B, L', dim]."""
        c = self.config
        if text is None:
            if self.text_context is None:
                raise InputError("No text conditioning: pass text features or store a text_context in the model.")
            text = self.text_context.expand(batch, -1, -1)
        if text.ndim != 3 or text.shape[-1] != c.text_dim or text.shape[0] not in (1, batch):
            raise InputError(f"text must be [B, L, {c.text_dim}], got {tuple(text.shape)}.")
        text = text.expand(batch, -1, -1)
        if text.shape[1] < c.text_len:
            text = F.pad(text, (0, 0, 0, c.text_len - text.shape[1]))
        return self.text_embedding(text.to(self.text_embedding[0].weight.dtype))

    def embed_audio(self, audio, num_latent_frames: int):
        """Per-video-frame audio windows [B, F_video, A, audio_dim] -> keys per latent frame [B*T, 4A, dim]."""
        c = self.config
        need = video_frames_for(num_latent_frames, c.temporal_compression)
        if audio.ndim != 4 or audio.shape[1] != need or audio.shape[-1] != c.audio_dim:
            raise InputError(f"audio must be [B, {need}, A, {c.audio_dim}] for {num_latent_frames} latent frames, "
                             f"got {tuple(audio.shape)}.")
        a = self.audio_embedding(audio.to(self.audio_embedding[0].weight.dtype))
        idx = latent_audio_index(num_latent_frames, c.temporal_compression, a.device)
        return rearrange(a[:, idx], "b t k a c -> (b t) (k a) c")

    def patchify(self, x, source):
        """Patch-embed x (and source through the extra, zero-initialised input channels): [B, L, dim] fp32."""
        c, w = self.config, self.patch_embedding.weight
        h = F.conv3d(x.to(w.dtype), w[:, : c.in_dim], self.patch_embedding.bias, stride=c.patch_size)
        if source is not None and c.source_concat:
            # conv(cat[x, s], W) == conv(x, W_x) + conv(s, W_s); split so zero W_s is bit-exact
            h = h + F.conv3d(source.to(w.dtype), w[:, c.in_dim:], None, stride=c.patch_size)
        return rearrange(h, "b c t h w -> b (t h w) c").float()

    def _check(self, x, source):
        c = self.config
        if x.ndim != 5 or x.shape[1] != c.in_dim:
            raise InputError(f"x must be a latent [B, {c.in_dim}, T, H, W], got {tuple(x.shape)}.")
        if any(s % p for s, p in zip(x.shape[2:], c.patch_size)):
            raise InputError(f"Latent size {tuple(x.shape[2:])} is not divisible by the patch {c.patch_size}.")
        if source is not None and source.shape != x.shape:
            raise InputError(f"source must have the latent's shape {tuple(x.shape)}, got {tuple(source.shape)}.")
        if source is None and c.prediction == "source-residual":
            raise InputError("This model predicts the edit of its source: pass the source latents.")

    def forward(self, x, sigma, source=None, audio=None, text=None, *, audio_mask=None):
        """Velocity v = eps - x0 for a noisy latent.

        x: [B, 16, T, H, W]; sigma: [B] or scalar in [0, 1]; source: [B, 16, T, H, W] or None;
        audio: [B, 4*(T-1)+1, A, audio_dim] per-video-frame audio windows or None (null audio: the audio
        cross-attention is skipped); text: [B or 1, L, text_dim] or None (use the stored text_context);
        audio_mask: optional bool [B], False rows get null audio (batched CFG).
        Returns [B, 16, T, H, W] in x's dtype.
        """
        c = self.config
        self._check(x, source)
        b, _, t, hh, ww = x.shape
        grid = (t // c.patch_size[0], hh // c.patch_size[1], ww // c.patch_size[2])
        sigma = torch.as_tensor(sigma, device=x.device, dtype=torch.float32).reshape(-1)
        if sigma.numel() not in (1, b):
            raise InputError(f"sigma must be a scalar or have one value per batch item ({b}), got {sigma.numel()}.")
        sigma = sigma.expand(b)
        tokens = self.patchify(x, source)
        e, e0 = self.embed_time(sigma)
        context = self.embed_text(text, b)
        freqs = rope_freqs(c.head_dim, grid, device=x.device)
        a_ctx = a_gate = None
        if audio is not None and c.enable_audio:
            a_ctx = self.embed_audio(audio, grid[0])
            if audio_mask is not None:
                a_gate = audio_mask.to(device=x.device, dtype=torch.float32).reshape(b, 1, 1)
        for blk in self.blocks:
            args = (tokens, e0, freqs, context, a_ctx, a_gate, grid[0])
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                tokens = checkpoint(blk, *args, use_reentrant=False)
            else:
                tokens = blk(*args)
        y = self.head(tokens, e)
        pt, ph, pw = c.patch_size
        y = rearrange(y, "b (t h w) (pt ph pw c) -> b c (t pt) (h ph) (w pw)",
                      t=grid[0], h=grid[1], w=grid[2], pt=pt, ph=ph, pw=pw)
        if c.prediction == "source-residual":
            x0 = source.float() + y.float()
            y = (x.float() - x0) / sigma.clamp_min(MIN_SIGMA).view(b, 1, 1, 1, 1)
        return y.to(x.dtype)


def _key_report(missing, unexpected, bad=(), show: int = 8) -> str:
    parts = []
    for name, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", bad)):
        if keys:
            more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
            parts.append(f"{len(keys)} {name}: {', '.join(keys[:show])}{more}")
    return "The weights do not fit the OmniSync DiT: " + "; ".join(parts) + "."


def num_params(preset: "str | DiTConfig") -> dict:
    """Parameter counts of a preset, built on the meta device: {'total', 'base' (Wan2.1 T2V), 'new'}."""
    with torch.device("meta"):
        model = OmniSyncDiT(get_config(preset))
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    new = sum(p.numel() for n, p in model.named_parameters() if OmniSyncDiT.is_new_key(n))
    if c.source_concat:
        new += c.dim * c.in_dim * c.patch_size[0] * c.patch_size[1] * c.patch_size[2]
    return {"total": total, "base": total - new, "new": new}
