"""3D rotary position embedding of Wan2.1 (complex rotation, head dim split into t/h/w bands)."""

import torch


def rope_band_dims(head_dim: int) -> tuple[int, int, int]:
    """Channels of the head dim given to the (t, h, w) axes; h and w get 2*(d//6) each, t the rest."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head dim, got {head_dim}.")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def _axis_angles(n: int, band: int, theta: float, device) -> torch.Tensor:
    # float64 as Wan; MPS has no float64
    dt = torch.float32 if torch.device(device).type == "mps" else torch.float64
    inv = 1.0 / theta ** (torch.arange(0, band, 2, device=device, dtype=dt) / band)
    return torch.outer(torch.arange(n, device=device, dtype=dt), inv)


def rope_freqs(head_dim: int, grid: tuple[int, int, int], device=None, theta: float = 10000.0) -> torch.Tensor:
    """Unit complex rotations for a (T, H, W) token grid in (t h w) order: complex64 [T*H*W, head_dim // 2]."""
    t, h, w = grid
    bt, bh, bw = rope_band_dims(head_dim)
    at, ah, aw = (_axis_angles(n, b, theta, device) for n, b in ((t, bt), (h, bh), (w, bw)))
    angles = torch.cat([
        at[:, None, None].expand(t, h, w, -1),
        ah[None, :, None].expand(t, h, w, -1),
        aw[None, None, :].expand(t, h, w, -1),
    ], dim=-1).reshape(t * h * w, head_dim // 2)
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def rope_apply(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate consecutive channel pairs of x [B, heads, L, head_dim] by freqs [L, head_dim // 2]; fp32 math."""
    xc = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)).contiguous())
    return torch.view_as_real(xc * freqs).flatten(-2).to(x.dtype)
