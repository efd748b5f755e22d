"""SyncNet and the LSE-C / LSE-D lip-sync scores.

Architecture: the audio-visual network of Chung & Zisserman, "Out of time: automated lip sync in the wild" (ACCV
2016 workshops), as released in joonson/syncnet_python (``SyncNetModel.S``, weights ``syncnet_v2.model``). Key
names follow that module so the public weights load after a one-time conversion (:func:`convert_syncnet`).

- lips: 5 face crops (224 x 224, BGR, 0..255, no normalisation) -> Conv3d stack -> 512 -> MLP -> 1024
- audio: 13 MFCC x 20 steps (0.2 s, python_speech_features defaults on int16-scale 16 kHz PCM) -> Conv2d
  stack -> 512 -> MLP -> 1024

Scores (syncnet_python ``SyncNetInstance.evaluate``; the Wav2Lip paper, Prajwal et al. 2020, named them LSE):
for video window i (frames i..i+4) with embedding v_i and audio embeddings a_j (zero-padded by ``vshift`` on
each side), ``d_i(k) = || v_i - a_{i+k} + 1e-6 ||_2`` for k in -vshift..vshift, ``D(k) = mean_i d_i(k)``;
**LSE-D** = min_k D(k) (lower is better), **LSE-C** = median_k D(k) - min_k D(k) (higher is better), and the
audio-video offset is ``-argmin_k D(k)`` frames (positive: the audio leads the video).
"""

from __future__ import annotations

import math
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import InputError
from ..model.loading import CheckpointError, CheckpointMismatchError, read_safetensors, validate_state_dict

SYNCNET_FPS = 25
SYNCNET_RATE = 16000
CROP = 224
WINDOW = 5                 # video frames per embedding
MFCC_PER_FRAME = 4         # 100 MFCC steps per second / 25 fps
DEFAULT_VSHIFT = 15        # syncnet_python's demo and pipeline default

# (out channels, kernel, stride, padding) of each conv (each followed by BatchNorm and ReLU); "pool" entries are
# (kernel, stride, padding) max-pools. Sequential indices then match syncnet_python's modules.
_AUDIO_CNN = [(64, 3, 1, 1), ("pool", (1, 1), (1, 1), 0), (192, 3, 1, 1), ("pool", (3, 3), (1, 2), 0),
              (384, 3, 1, 1), (256, 3, 1, 1), (256, 3, 1, 1), ("pool", (3, 3), (2, 2), 0), (512, (5, 4), 1, 0)]
_LIP_CNN = [(96, (5, 7, 7), (1, 2, 2), 0), ("pool", (1, 3, 3), (1, 2, 2), 0),
            (256, (1, 5, 5), (1, 2, 2), (0, 1, 1)), ("pool", (1, 3, 3), (1, 2, 2), (0, 1, 1)),
            (256, (1, 3, 3), 1, (0, 1, 1)), (256, (1, 3, 3), 1, (0, 1, 1)), (256, (1, 3, 3), 1, (0, 1, 1)),
            ("pool", (1, 3, 3), (1, 2, 2), 0), (512, (1, 6, 6), 1, 0)]


class FrozenBatchNorm(nn.Module):
    """Inference BatchNorm (any rank) with BatchNorm's parameter names but no ``num_batches_tracked``."""

    def __init__(self, channels: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def _cnn(spec, dims: int, channels: int) -> nn.Sequential:
    conv, pool = (nn.Conv2d, nn.MaxPool2d) if dims == 2 else (nn.Conv3d, nn.MaxPool3d)
    layers = []
    for item in spec:
        if item[0] == "pool":
            layers.append(pool(item[1], item[2], item[3]))
            continue
        out, k, s, p = item
        layers += [conv(channels, out, k, s, p), FrozenBatchNorm(out), nn.ReLU()]
        channels = out
    return nn.Sequential(*layers)


def _mlp(out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(512, 512), FrozenBatchNorm(512), nn.ReLU(), nn.Linear(512, out))


class SyncNet(nn.Module):
    """syncnet_python's ``S``: ``forward_lip [N, 3, 5, 224, 224] -> [N, D]``, ``forward_aud [N, 1, 13, 20] ->
    [N, D]`` (D = ``embed_dim``, 1024 in the public weights)."""

    def __init__(self, embed_dim: int = 1024):
        super().__init__()
        self.netcnnaud = _cnn(_AUDIO_CNN, 2, 1)
        self.netfcaud = _mlp(embed_dim)
        self.netfclip = _mlp(embed_dim)
        self.netcnnlip = _cnn(_LIP_CNN, 3, 3)

    def forward_aud(self, mfcc: Tensor) -> Tensor:
        return self.netfcaud(self.netcnnaud(mfcc).flatten(1))

    def forward_lip(self, crops: Tensor) -> Tensor:
        return self.netfclip(self.netcnnlip(crops).flatten(1))


def syncnet_shapes(embed_dim: int = 1024) -> dict[str, tuple]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in SyncNet(embed_dim).state_dict().items()}


# ------------------------------------------------------------------------------------------------ weights

def _embed_dim(state_dict) -> int:
    w = state_dict.get("netfcaud.3.weight")
    return int(w.shape[0]) if w is not None else 1024


def _check(state_dict, what: str) -> dict:
    sd = {k: v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    report = validate_state_dict(sd, syncnet_shapes(_embed_dim(sd)))
    if not report.ok:
        raise CheckpointMismatchError(f"SyncNet ({what})", report)
    return sd


def _read_pickle(path: Path) -> dict:
    """The checkpoint's tensors, unpickled with ``torch.load(weights_only=True)`` only. Zip checkpoints go through
    :func:`omnisync_core.model.convert._load_pickle` (memory-mapped); the 2017-era legacy format of
    ``syncnet_v2.model`` cannot be memory-mapped, so it is read whole (it is 50 MB)."""
    from ..model.convert import _load_pickle, _unwrap

    if zipfile.is_zipfile(path):
        obj = _load_pickle(path)
    else:
        import pickle

        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as e:
            raise CheckpointError(f"{path.name} was refused: it holds objects other than tensors and plain "
                                  f"containers, which could run code when unpickled ({str(e).splitlines()[0]}).") \
                from None
        except (RuntimeError, ValueError, EOFError, OSError) as e:
            raise CheckpointError(f"{path.name} is not a PyTorch checkpoint ({e}).") from None
    return _unwrap(obj, path.name)[0]


def convert_syncnet(path, out=None) -> Path:
    """``syncnet_v2.model`` (a pickled state dict) -> ``.safetensors`` beside it (or at ``out``); returns the path.
    Reads with ``torch.load(weights_only=True)`` only, checks every key and shape against :class:`SyncNet` (drops
    BatchNorm's ``num_batches_tracked``), writes float32 tensors through a temporary file."""
    from safetensors.torch import save_file

    from ..fsutil import publish

    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"SyncNet checkpoint not found: {path}.")
    sd = _check(_read_pickle(path), path.name)
    out = Path(out).expanduser() if out is not None else path.with_suffix(".safetensors")
    if out.resolve() == path.resolve():
        raise CheckpointError(f"The output {out} would overwrite the source checkpoint.")
    partial = out.with_name(out.name + ".partial")
    try:
        save_file({k: v.float().contiguous() for k, v in sd.items()}, str(partial),
                  metadata={"kind": "syncnet", "source_file": path.name, "embed_dim": str(_embed_dim(sd))})
        publish(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out


def load_syncnet(path_or_state_dict, device="cpu") -> SyncNet:
    """A :class:`SyncNet` from a converted safetensors file (or a state dict), strict, in eval mode."""
    if isinstance(path_or_state_dict, (str, Path)):
        sd, _ = read_safetensors(path_or_state_dict, device=device)
        what = Path(path_or_state_dict).name
    else:
        sd, what = dict(path_or_state_dict), "state dict"
    sd = _check(sd, what)
    with torch.device("meta"):
        model = SyncNet(_embed_dim(sd))
    model.load_state_dict(sd, strict=True, assign=True)
    return model.eval().to(device)


# ------------------------------------------------------------------------------------------------ audio

def _hz2mel(hz):
    return 2595.0 * torch.log10(1 + hz / 700.0)


def _mel2hz(mel):
    return 700.0 * (10 ** (mel / 2595.0) - 1)


def mel_filterbank(nfilt: int = 26, nfft: int = 512, rate: int = SYNCNET_RATE) -> Tensor:
    """python_speech_features' triangular filters ``[nfilt, nfft // 2 + 1]`` on floor-rounded FFT bins."""
    mel = torch.linspace(float(_hz2mel(torch.tensor(0.0, dtype=torch.float64))),
                         float(_hz2mel(torch.tensor(rate / 2, dtype=torch.float64))), nfilt + 2, dtype=torch.float64)
    bins = torch.floor((nfft + 1) * _mel2hz(mel) / rate)
    i = torch.arange(nfft // 2 + 1, dtype=torch.float64)
    lo, mid, hi = bins[:-2, None], bins[1:-1, None], bins[2:, None]
    up = torch.where((i >= lo) & (i < mid), (i - lo) / (mid - lo).clamp_min(1), 0.0)
    down = torch.where((i >= mid) & (i < hi), (hi - i) / (hi - mid).clamp_min(1), 0.0)
    return up + down


def mfcc(pcm: Tensor, rate: int = SYNCNET_RATE, numcep: int = 13, nfilt: int = 26, nfft: int = 512,
         winlen: float = 0.025, winstep: float = 0.01, preemph: float = 0.97, ceplifter: int = 22) -> Tensor:
    """MFCC ``[numcep, frames]`` (float64) of ``pcm [N]`` as python_speech_features 0.6 ``mfcc`` computes it with
    its defaults: pre-emphasis, 25 ms rectangular frames every 10 ms (the last one zero-padded), power spectrum
    ``|rfft|^2 / nfft``, log mel energies, orthonormal DCT-II, sinusoidal lifter, coefficient 0 replaced by the log
    frame energy. Feed int16-scale samples (SyncNet was trained on ``wavfile.read`` output)."""
    x = torch.as_tensor(pcm, dtype=torch.float64).reshape(-1)
    x = torch.cat([x[:1], x[1:] - preemph * x[:-1]])
    flen, fstep = int(math.floor(winlen * rate + 0.5)), int(math.floor(winstep * rate + 0.5))
    count = 1 if x.numel() <= flen else 1 + math.ceil((x.numel() - flen) / fstep)
    x = F.pad(x, (0, (count - 1) * fstep + flen - x.numel()))
    frames = x.unfold(0, flen, fstep)
    power = torch.fft.rfft(frames, nfft).abs().square() / nfft
    eps = torch.finfo(torch.float64).eps
    energy = power.sum(1)
    energy = torch.where(energy == 0, eps, energy)
    feat = power @ mel_filterbank(nfilt, nfft, rate).T
    feat = torch.where(feat == 0, eps, feat).log()
    n, k = torch.arange(nfilt, dtype=torch.float64), torch.arange(numcep, dtype=torch.float64)
    dct = torch.cos(math.pi * k[:, None] * (2 * n[None] + 1) / (2 * nfilt)) * math.sqrt(2.0 / nfilt)
    dct[0] /= math.sqrt(2.0)
    ceps = feat @ dct.T
    ceps = ceps * (1 + ceplifter / 2 * torch.sin(math.pi * k / ceplifter))
    ceps[:, 0] = energy.log()
    return ceps.T


# ------------------------------------------------------------------------------------------------ video

def _median_smooth(x: Tensor, kernel: int = 13) -> Tensor:
    """Running median (syncnet_python smooths its face track with ``scipy.signal.medfilt(kernel_size=13)``; we pad
    by repeating the ends instead of with zeros, which would shrink the first and last boxes)."""
    if x.shape[0] < 2:
        return x
    k = min(kernel, 2 * ((x.shape[0] - 1) // 2) + 1)
    p = k // 2
    padded = torch.cat([x[:1].expand(p, *x.shape[1:]), x, x[-1:].expand(p, *x.shape[1:])])
    return padded.unfold(0, k, 1).median(dim=-1).values


def syncnet_crops(frames: Tensor, boxes: Tensor, crop_scale: float = 0.4, size: int = CROP,
                  pad_value: float = 110.0) -> Tensor:
    """The face crops SyncNet expects ``[T, 3, size, size]`` float 0..255 **BGR**, from RGB ``frames [T, H, W, 3]``
    (uint8 or float 0..1) and face boxes ``[T, 4]`` (x0, y0, x1, y1). As syncnet_python's ``crop_video``: half-size
    ``s = max(w, h) / 2`` and centre median-smoothed over 13 frames; the crop spans x in ``cx +- s (1 + c)`` and y
    from ``cy - s`` to ``cy + s (1 + 2c)`` (c = ``crop_scale``), outside the frame filled with 110; bilinear
    resampling to ``size`` (the reference cuts at integer pixels and resizes with cv2, a sub-pixel difference)."""
    img = frames.float() if frames.is_floating_point() else frames.float() / 255.0
    img = img.mul(255.0).permute(0, 3, 1, 2).flip(1)                                 # BGR, 0..255
    t, _, h, w = img.shape
    b = boxes.float()
    s = _median_smooth(torch.maximum(b[:, 2] - b[:, 0], b[:, 3] - b[:, 1]) / 2)
    cx, cy = _median_smooth((b[:, 0] + b[:, 2]) / 2), _median_smooth((b[:, 1] + b[:, 3]) / 2)
    x0, x1 = cx - s * (1 + crop_scale), cx + s * (1 + crop_scale)
    y0, y1 = cy - s, cy + s * (1 + 2 * crop_scale)
    u = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    gx = (x0[:, None] + u[None] * (x1 - x0)[:, None]) * (2.0 / w) - 1                  # [T, size]
    gy = (y0[:, None] + u[None] * (y1 - y0)[:, None]) * (2.0 / h) - 1
    grid = torch.stack([gx[:, None, :].expand(t, size, size), gy[:, :, None].expand(t, size, size)], -1)
    return F.grid_sample(img - pad_value, grid, mode="bilinear", padding_mode="zeros", align_corners=False) + pad_value


def resample_frames(num_frames: int, fps: float, target: float = SYNCNET_FPS) -> Tensor:
    """Source frame shown at each ``target``-fps instant (SyncNet needs 25 fps; the reference re-encodes with
    ``ffmpeg -r 25``)."""
    count = max(1, int(math.floor(num_frames * target / fps + 1e-6)))
    return (torch.arange(count, dtype=torch.float64) * (fps / target) + 1e-6).floor().long().clamp(max=num_frames - 1)


# ------------------------------------------------------------------------------------------------ scores

@dataclass
class LSEResult:
    lse_c: float          # confidence: median minus minimum of the mean distance over offsets
    lse_d: float          # the minimum mean distance
    offset: int           # frames; positive: audio leads video
    distances: Tensor     # [2 * vshift + 1] mean distance per candidate shift (index vshift = no shift)


def sync_distances(lip: Tensor, aud: Tensor, vshift: int = DEFAULT_VSHIFT) -> Tensor:
    """``[N, 2 vshift + 1]`` distances between video embedding i and audio embedding i + k (zeros past the ends),
    with ``pairwise_distance``'s ``+ 1e-6`` (syncnet_python ``calc_pdist``)."""
    n = lip.shape[0]
    padded = F.pad(aud, (0, 0, vshift, vshift))
    index = torch.arange(n)[:, None] + torch.arange(2 * vshift + 1)[None]
    return (lip[:, None] - padded[index] + 1e-6).norm(dim=-1)


def sync_scores(lip: Tensor, aud: Tensor, vshift: int = DEFAULT_VSHIFT) -> LSEResult:
    """LSE-C, LSE-D and the offset from per-window embeddings ``lip [N, D]`` and ``aud [N, D]``."""
    mean = sync_distances(lip, aud, vshift).mean(0)
    low, at = mean.min(0)
    return LSEResult(float(mean.median() - low), float(low), int(vshift - int(at)), mean)


@torch.no_grad()
def syncnet_embeddings(model: SyncNet, crops: Tensor, pcm_16k: Tensor, batch: int = 20,
                       device=None) -> tuple[Tensor, Tensor]:
    """Per-window embeddings as ``SyncNetInstance.evaluate`` computes them: ``crops [T, 3, 224, 224]`` at 25 fps
    (from :func:`syncnet_crops`), ``pcm_16k [N]`` float in -1..1 (scaled to int16 range here). Windows i = 0 ..
    min(T, N // 640) - 6 (the reference stops one window short of the end)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    pcm = torch.as_tensor(pcm_16k, dtype=torch.float64).reshape(-1)
    cc = mfcc((pcm * 32768.0).round().clamp(-32768, 32767)).float()
    last = min(crops.shape[0], pcm.numel() // (SYNCNET_RATE // SYNCNET_FPS)) - WINDOW
    if last <= 0:
        raise InputError(f"SyncNet needs at least {WINDOW + 1} frames of video with audio, got {last + WINDOW}")
    lips, auds = [], []
    for start in range(0, last, batch):
        idx = torch.arange(start, min(last, start + batch))
        clip = torch.stack([crops[i:i + WINDOW] for i in idx.tolist()]).transpose(1, 2)   # [n, 3, 5, H, W]
        cols = (idx[:, None] * MFCC_PER_FRAME + torch.arange(20)[None]).clamp(max=cc.shape[1] - 1)
        lips.append(model.forward_lip(clip.to(device)).float().cpu())
        auds.append(model.forward_aud(cc[:, cols].permute(1, 0, 2)[:, None].to(device)).float().cpu())
    return torch.cat(lips), torch.cat(auds)


def lse(model: SyncNet, frames: Tensor, boxes: Tensor, pcm_16k: Tensor, fps: float = SYNCNET_FPS,
        vshift: int = DEFAULT_VSHIFT, device=None) -> LSEResult:
    """LSE-C / LSE-D of RGB ``frames [T, H, W, 3]`` with face ``boxes [T, 4]`` against 16 kHz speech."""
    index = resample_frames(frames.shape[0], float(fps))
    crops = syncnet_crops(frames[index], boxes[index])
    lip, aud = syncnet_embeddings(model, crops, pcm_16k, device=device)
    return sync_scores(lip, aud, vshift)


def syncnet_checkpoint_kind(path) -> Optional[str]:
    """"syncnet" when a safetensors file holds SyncNet's keys, else None (for ``omnisync check-model``)."""
    from ..model.loading import read_header

    info, _ = read_header(path)
    return "syncnet" if "netcnnlip.0.weight" in info and "netfcaud.3.weight" in info else None
