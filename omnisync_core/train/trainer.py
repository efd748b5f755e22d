"""Flow-matching training of the OmniSync DiT on paired face-crop windows (paper Eq. 1-3), single process or
under torchrun (DDP or FSDP2), with resumable safetensors checkpoints.

One step: the sampler draws, for every position of the global batch, an item and its sigma (then the pair, the
noise and the audio dropout from a per-item seed), so a run is a pure function of ``(seed, step)`` whatever the
number of processes; rank r computes its contiguous slice. ``z0 = codec.encode(V_ab)``, ``z_src =
codec.encode(V_cd)`` (frozen codec), ``x = (1 - sigma) z0 + sigma eps``, the DiT predicts ``v = eps - z0`` from
``(x, sigma, z_src, A_ab)`` with audio rows dropped at ``audio_dropout`` (classifier-free guidance), MSE.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import random
import re
import sys
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from ..errors import OmniSyncError
from ..model.dit import MIN_SIGMA, DiTConfig, OmniSyncDiT, get_config
from .config import ConfigError, TrainConfig, build_codec, load_config
from .data import LipSyncDataset, PairSampler, _atomic_save

__all__ = ["Trainer", "sample_sigma", "train_main", "export_bundle", "BUNDLE_EXPORTERS", "latest_checkpoint"]

log = logging.getLogger(__name__)

CKPT_FORMAT = "omnisync-train-checkpoint"
CKPT_PATTERN = re.compile(r"^step_(\d{8})\.safetensors$")
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def sample_sigma(generator: torch.Generator, mode: str = "logit-normal", mean: float = 0.0, std: float = 1.0,
                 shift: float = 1.0) -> float:
    """One training noise level in (0, 1): logit-normal or uniform, then Wan's shift ``s u / (1 + (s - 1) u)``."""
    if mode == "uniform":
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
    else:
        u = float(torch.sigmoid(mean + std * torch.randn((), generator=generator, dtype=torch.float64)))
    return shift * u / (1.0 + (shift - 1.0) * u)


# ------------------------------------------------------------------------------------------------ distributed


def _init_distributed(cfg: TrainConfig) -> tuple[int, int, torch.device, bool]:
    """(rank, world size, device, whether we created the process group) from torchrun's environment."""
    from ..model.loading import resolve_device

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.distributed == "none":
        raise ConfigError(f"Launched with {world} processes but distributed = 'none'; set 'ddp' or 'fsdp'.")
    use_cuda = torch.cuda.is_available() and cfg.device in ("auto", "cuda") or cfg.device.startswith("cuda")
    if world == 1 or cfg.distributed == "none":
        return 0, 1, resolve_device(cfg.device), False
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if use_cuda else "gloo")
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda:
        torch.cuda.set_device(local)
        device = torch.device("cuda", local)
    else:
        device = torch.device("cpu")
    return dist.get_rank(), dist.get_world_size(), device, created


def _full(t: Tensor) -> Tensor:
    """A DTensor's full value (a collective: every rank must call it), or the tensor itself."""
    return t.full_tensor() if hasattr(t, "full_tensor") else t


# ------------------------------------------------------------------------------------------------ RNG state


def _rng_tensors() -> tuple[dict[str, Tensor], dict]:
    tensors = {"rng.torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            tensors[f"rng.cuda.{i}"] = s
    version, words, gauss = random.getstate()
    tensors["rng.python"] = torch.from_numpy(np.asarray(words, dtype=np.uint32).view(np.uint8).copy())
    name, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng.numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).view(np.uint8).copy())
    meta = {"python": [version, gauss], "numpy": [name, int(pos), int(has_gauss), float(cached)]}
    return tensors, meta


def _set_rng(tensors: dict[str, Tensor], meta: dict) -> None:
    torch.set_rng_state(tensors["rng.torch"])
    cuda = [tensors[k] for k in sorted(k for k in tensors if k.startswith("rng.cuda."))]
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    version, gauss = meta["python"]
    random.setstate((version, tuple(int(w) for w in tensors["rng.python"].numpy().view(np.uint32)), gauss))
    name, pos, has_gauss, cached = meta["numpy"]
    np.random.set_state((name, tensors["rng.numpy"].numpy().view(np.uint32), pos, has_gauss, cached))


# ------------------------------------------------------------------------------------------------ checkpoints


def _flatten_optimizer(osd: dict) -> tuple[dict[str, Tensor], dict]:
    """Optimizer state dict (keyed by parameter names) -> tensors ``optim.<param>.<key>`` + JSON structure."""
    tensors, scalars = {}, {}
    for name, state in osd.get("state", {}).items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"optim.{name}.{key}"] = value.detach().cpu()
            else:
                scalars[f"{name}.{key}"] = value
    groups = [{k: list(v) if isinstance(v, tuple) else v for k, v in g.items()} for g in osd.get("param_groups", [])]
    return tensors, {"param_groups": groups, "scalars": scalars, "params": sorted(osd.get("state", {}))}


def _unflatten_optimizer(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[str, dict] = {name: {} for name in meta["params"]}
    # parameter names contain dots: match the longest known name that prefixes the key
    names = sorted(meta["params"], key=len, reverse=True)
    for key, value in tensors.items():
        rest = key[len("optim."):]
        name = next(n for n in names if rest.startswith(n + "."))
        state[name][rest[len(name) + 1:]] = value
    for key, value in meta["scalars"].items():
        name = next(n for n in names if key.startswith(n + "."))
        state[name][key[len(name) + 1:]] = value
    groups = [{k: tuple(v) if k == "betas" else v for k, v in g.items()} for g in meta["param_groups"]]
    return {"state": state, "param_groups": groups}


def latest_checkpoint(folder) -> Optional[Path]:
    """The checkpoint with the highest step in ``folder`` (``step_NNNNNNNN.safetensors``), or None."""
    folder = Path(folder)
    found = sorted((int(m.group(1)), p) for p in folder.glob("step_*.safetensors")
                   if (m := CKPT_PATTERN.match(p.name)))
    return found[-1][1] if found else None


def mouth_loss_weights(samples: list[dict], latent_shape: tuple, extra: float) -> Tensor:
    """Per-latent-cell loss weights ``[B, 1, t, h, w]``: 1, plus ``extra`` inside an ellipse around the mouth
    (0.32 face widths across, 0.22 high) of each latent frame. Samples without mouth positions weigh 1."""
    from ..generator import latent_mouths

    b, _, t, h, w = latent_shape
    weights = torch.ones(b, 1, t, h, w)
    for i, s in enumerate(samples):
        mouth, width = s.get("mouth_xy"), s.get("face_width")
        if mouth is None or not torch.isfinite(mouth).all() or not torch.isfinite(width).all():
            continue
        n, size = s["video"].shape[1], s["video"].shape[-1]
        temporal = (n - 1) // (t - 1) if t > 1 else 1
        m, fw = latent_mouths(mouth, width, size, (h, w), temporal)             # latent cells
        xs, ys = torch.arange(w) + 0.5, torch.arange(h) + 0.5
        dx = (xs[None, None, :] - m[:, 0, None, None]) / (0.32 * fw[:, None, None]).clamp_min(1e-3)
        dy = (ys[None, :, None] - m[:, 1, None, None]) / (0.22 * fw[:, None, None]).clamp_min(1e-3)
        weights[i, 0] += extra * ((dx.square() + dy.square()) < 1).float()
    return weights


# ------------------------------------------------------------------------------------------------ bundles


def _export_wan_bundle(path: Path, dit: OmniSyncDiT, codec, audio_encoder, defaults: dict) -> Path:
    from ..model.bundle import save_bundle
    from ..model.vae import WanVAE

    if not isinstance(codec, WanVAE):
        raise ConfigError("the wan-vae bundle exporter needs a WanVAE codec")
    return save_bundle(path, dit, codec, audio_encoder, defaults=defaults)


# codec name -> exporter(path, dit, codec, audio_encoder, defaults) -> written path. A codec helper registers its
# own exporter here (e.g. a bundle variant that stores its codec in place of the VAE).
def _export_pixel_bundle(path: Path, dit: OmniSyncDiT, codec, audio_encoder, defaults: dict) -> Path:
    from ..model.bundle import save_bundle
    from ..model.pixel_codec import PixelCodec

    if not isinstance(codec, PixelCodec):
        raise ConfigError("the pixel bundle exporter needs a PixelCodec")
    return save_bundle(path, dit, codec, audio_encoder, defaults=defaults)


BUNDLE_EXPORTERS: dict[str, Callable[..., Path]] = {"wan-vae": _export_wan_bundle, "pixel": _export_pixel_bundle}


def export_bundle(path, dit: OmniSyncDiT, codec, audio_encoder, defaults: dict, codec_name: str) -> Path:
    """Write the trained model for inference. Codecs with an exporter in :data:`BUNDLE_EXPORTERS` (``wan-vae``:
    a :func:`~omnisync_core.model.bundle.save_bundle` file for ``omnisync lipsync --model``) use it when an
    audio encoder is known; otherwise the DiT alone is written next to ``path`` as ``dit.safetensors`` (kind
    ``dit``, with the defaults in its metadata) and a warning says why."""
    from ..model.loading import save_model

    path = Path(path)
    exporter = BUNDLE_EXPORTERS.get(codec_name)
    if exporter is not None and audio_encoder is not None:
        return exporter(path, dit, codec, audio_encoder, defaults)
    why = "no audio_encoder is configured" if exporter is not None else f"codec {codec_name!r} has no bundle exporter"
    out = path.with_name("dit.safetensors")
    log.warning("writing the DiT alone to %s (%s)", out, why)
    return save_model(dit, out, kind="dit", extra_metadata={"defaults": json.dumps(defaults)})


# ------------------------------------------------------------------------------------------------ trainer


class Trainer:
    """Owns the model, optimizer, data and bookkeeping of one run. ``codec``, ``dataset`` and ``audio_encoder``
    may be given directly (tests, notebooks); otherwise they are built from the config."""

    def __init__(self, config: TrainConfig, codec=None, dataset: Optional[LipSyncDataset] = None,
                 audio_encoder: Optional[nn.Module] = None):
        self.cfg = cfg = config
        self.rank, self.world, self.device, self._own_group = _init_distributed(cfg)
        if cfg.batch_size % self.world:
            raise ConfigError(f"batch_size {cfg.batch_size} does not split over {self.world} processes.")
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed % 2**32)
        self.out_dir = Path(cfg.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        if self.is_main:
            self.ckpt_dir.mkdir(parents=True, exist_ok=True)
        self.audio_encoder = audio_encoder if audio_encoder is not None else self._load_audio_encoder()

        self.codec = codec if codec is not None else build_codec(cfg)
        if isinstance(self.codec, nn.Module):
            self.codec.to(device=self.device, dtype=_DTYPES[cfg.codec_dtype]).eval().requires_grad_(False)
        self.dataset = dataset if dataset is not None else self._build_dataset()
        self.sampler = PairSampler(len(self.dataset), cfg.batch_size, cfg.seed, self._sigma)

        self.dit = self._build_dit()
        self.model = self._wrap(self.dit)
        self.params = [p for p in self.model.parameters() if p.requires_grad]
        self.param_names = [n for n, p in self.model.named_parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
        self.ema = [p.detach().clone().float() for p in self.params] if cfg.ema_decay else None
        self.step = 0
        self.history: list[dict] = []
        self._cache: dict[tuple, Tensor] = {}
        self._pool, self._pending = None, {}
        self._autocast = (torch.autocast(self.device.type, dtype=torch.bfloat16)
                          if cfg.bf16 and (self.device.type == "cuda" or cfg.cpu_bf16) else nullcontext())

    # ------------------------------------------------------------------ construction

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def _load_audio_encoder(self):
        if not self.cfg.audio_encoder:
            return None
        from ..model.loading import load_whisper

        return load_whisper(self.cfg.audio_encoder, device=self.device)

    def _build_dataset(self) -> LipSyncDataset:
        cfg = self.cfg
        if not cfg.data_dirs:
            raise ConfigError("Bad training config: data_dirs lists no shard folder.")
        return LipSyncDataset(cfg.data_dirs, window=cfg.window, audio_before=cfg.audio_before,
                              audio_after=cfg.audio_after, pair_threshold=cfg.pair_threshold,
                              exclusion=cfg.pair_exclusion, pseudo_mode=cfg.pseudo_mode,
                              audio_encoder=self.audio_encoder)

    def _sigma(self, generator: torch.Generator) -> float:
        c = self.cfg
        return sample_sigma(generator, c.sigma_sampling, c.sigma_mean, c.sigma_std, c.sigma_shift)

    def _probe_shapes(self) -> dict:
        """DiT fields the codec and data decide (for those not in model_overrides): latent channels and
        temporal compression from one encode, the audio feature width from the data."""
        s = self.dataset.sample(0, 0.0, torch.Generator().manual_seed(0))
        z = self.encode(s["video"][None])
        n, t = s["video"].shape[1], z.shape[2]
        stride = (n - 1) // (t - 1) if t > 1 else get_config(self.cfg.model).temporal_compression
        if t > 1 and stride * (t - 1) + 1 != n:
            raise ConfigError(f"The codec maps {n} frames to {t} latent frames; the DiT needs 1 + (n - 1) / k.")
        return {"in_dim": z.shape[1], "out_dim": z.shape[1], "audio_dim": s["audio"].shape[-1],
                "temporal_compression": stride}

    def _build_dit(self) -> OmniSyncDiT:
        cfg = self.cfg
        unknown = sorted(set(cfg.model_overrides) - set(get_config(cfg.model).to_dict()))
        if unknown:
            raise ConfigError(f"Unknown model_overrides keys (DiT config fields): {', '.join(unknown)}.")
        if cfg.init_from:
            from ..model.loading import load_dit, omnisync_from_wan

            if _header_meta(cfg.init_from).get("format") == "omnisync":
                dit = load_dit(cfg.init_from, device="cpu", dtype=torch.float32)
            else:                                 # a Wan2.1 T2V base: the audio and source parts start fresh
                dit = omnisync_from_wan(cfg.init_from, preset=get_config(cfg.model, **cfg.model_overrides),
                                        device="cpu", dtype=torch.float32)
        else:
            probed = self._probe_shapes()
            overrides = {**{k: v for k, v in probed.items() if k not in cfg.model_overrides}, **cfg.model_overrides}
            torch.manual_seed(cfg.seed)          # identical initial weights on every rank
            dit = OmniSyncDiT(get_config(cfg.model, **overrides))
        dit.train().float()
        if dit.text_context is None or cfg.text_context != "zeros":     # a given prompt file always wins
            dit.set_text_context(self._text_context(dit))
        dit.gradient_checkpointing = cfg.grad_checkpointing
        return dit.to(self.device)

    def _text_context(self, dit: OmniSyncDiT) -> Tensor:
        c = dit.config
        if self.cfg.text_context == "zeros":
            return torch.zeros(1, c.text_len, c.text_dim)
        from ..model.loading import read_safetensors

        tensors, _ = read_safetensors(self.cfg.text_context)
        t = tensors.get("text_context", next(iter(tensors.values()), None))
        if t is None:
            raise ConfigError(f"{self.cfg.text_context} holds no tensor.")
        return t.float()

    def _wrap(self, dit: OmniSyncDiT) -> nn.Module:
        if self.world == 1:
            return dit
        if self.cfg.distributed == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            return DDP(dit, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(self.device.type, (self.world,))
        for block in dit.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(dit, mesh=mesh)
        return dit

    # ------------------------------------------------------------------ one step

    def lr_at(self, step: int) -> float:
        """Learning rate for ``step`` (0-based): linear warmup, then constant or cosine to 0."""
        cfg = self.cfg
        if cfg.warmup and step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        if cfg.lr_schedule == "cosine" and cfg.steps > cfg.warmup:
            frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
            return cfg.lr * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))
        return cfg.lr

    @torch.no_grad()
    def encode(self, videos: Tensor, keys: Optional[list] = None) -> Tensor:
        """Frozen codec latents ``[B, C, t, h, w]`` (float32) of videos ``[B, 3, n, S, S]``, cached by ``keys``."""
        enc = lambda v: self.codec.encode(v.to(self.device, _DTYPES[self.cfg.codec_dtype])).float()  # noqa: E731
        if not self.cfg.cache_latents or keys is None:
            return enc(videos)
        missing = [i for i, k in enumerate(keys) if k not in self._cache]
        if missing:
            z = enc(videos[missing]).cpu()
            for i, zi in zip(missing, z):
                if len(self._cache) >= self.cfg.cache_size:
                    self._cache.pop(next(iter(self._cache)))
                self._cache[keys[i]] = zi
        return torch.stack([self._cache[k] for k in keys]).to(self.device)

    def _read(self, step: int) -> tuple[list, list, list]:
        items = self.sampler.shard(step, self.rank, self.world)
        gens = [torch.Generator().manual_seed(seed) for _, _, seed in items]
        return items, gens, [self.dataset.sample(i, s, g) for (i, s, _), g in zip(items, gens)]

    def _samples(self, step: int) -> tuple[list, list, list]:
        """Decoded samples of ``step``, read by one background thread that then starts on ``step + 1`` (the
        data are a function of the step, so prefetching changes nothing but the wall time)."""
        if not self.cfg.prefetch:
            return self._read(step)
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(1, thread_name_prefix="omnisync-data")
        future = self._pending.pop(step, None) or self._pool.submit(self._read, step)
        self._pending = {step + 1: self._pool.submit(self._read, step + 1)}
        return future.result()

    def local_batch(self, step: int) -> dict:
        """This rank's examples for ``step``: latents, noise, sigmas, audio and the audio-keep mask."""
        items, gens, samples = self._samples(step)
        key = lambda s, f: (s["clip"], tuple(s[f].tolist()))  # noqa: E731
        z0 = self.encode(torch.stack([s["video"] for s in samples]), [key(s, "target_frames") for s in samples])
        ref_key = lambda s: (*key(s, "reference_frames"), s.get("reference_kind") == "rendered")  # noqa: E731
        zs = self.encode(torch.stack([s["reference"] for s in samples]), [ref_key(s) for s in samples])
        eps = torch.stack([torch.randn(z0.shape[1:], generator=g) for g in gens]).to(self.device)
        keep = torch.tensor([bool(torch.rand((), generator=g) >= self.cfg.audio_dropout) for g in gens])
        batch = {"z0": z0, "z_src": zs, "eps": eps, "sigma": torch.tensor([s for _, s, _ in items]),
                 "audio": torch.stack([s["audio"] for s in samples]), "keep": keep,
                 "pseudo": torch.tensor([s["pseudo"] for s in samples])}
        if self.cfg.mouth_loss_weight:
            batch["weight"] = mouth_loss_weights(samples, z0.shape, self.cfg.mouth_loss_weight).to(self.device)
        return batch

    def loss_and_grads(self, step: int) -> float:
        """Forward and backward for ``step`` (gradients left in the parameters); returns the global mean loss."""
        b = self.local_batch(step)
        sigma = b["sigma"].to(self.device)
        s = sigma.view(-1, 1, 1, 1, 1)
        x = (1 - s) * b["z0"] + s * b["eps"]
        target = b["eps"] - b["z0"]
        self.opt.zero_grad(set_to_none=True)
        with self._autocast:
            pred = self.model(x, sigma, source=b["z_src"], audio=b["audio"].to(self.device),
                              audio_mask=b["keep"].to(self.device))
        pred = pred.float()
        if self.dit.config.prediction == "source-residual":   # x0 loss (velocity error times sigma)
            pred, target = x - s.clamp_min(MIN_SIGMA) * pred, b["z0"]
        if "weight" in b:
            w = b["weight"]
            loss = ((pred - target).square() * w).mean() / w.mean()
        else:
            loss = F.mse_loss(pred, target)
        loss.backward()
        value = loss.detach()
        if self.world > 1:
            dist.all_reduce(value)           # logging only: the mean over equal local batches is the global mean
            value = value / self.world
        return float(value)

    def optimizer_step(self, step: int) -> None:
        lr = self.lr_at(step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        if self.cfg.grad_clip:
            torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip)
        self.opt.step()
        if self.ema is not None:
            with torch.no_grad():
                for e, p in zip(self.ema, self.params):
                    e.lerp_(p.detach().float(), 1 - self.cfg.ema_decay)

    def train_step(self) -> float:
        """One full step at ``self.step``; advances it and records (step, loss, lr, sec/step)."""
        t0 = time.perf_counter()
        loss = self.loss_and_grads(self.step)
        self.optimizer_step(self.step)
        self.history.append({"step": self.step + 1, "loss": loss, "lr": self.lr_at(self.step),
                             "sec_per_step": time.perf_counter() - t0})
        self.step += 1
        return loss

    def fit(self, steps: Optional[int] = None) -> list[float]:
        """Train until ``steps`` (default: the config's) total steps; checkpoints, logs, CSV and plot on rank 0."""
        steps = self.cfg.steps if steps is None else steps
        losses = []
        while self.step < steps:
            losses.append(self.train_step())
            if self.step % self.cfg.log_every == 0 or self.step == steps:
                self._write_csv()
                if self.is_main:
                    h = self.history[-1]
                    log.info("step %d loss %.5f lr %.2e %.3f s/step", h["step"], h["loss"], h["lr"], h["sec_per_step"])
            if self.step % self.cfg.checkpoint_every == 0 or self.step == steps:
                self.save_checkpoint()
        return losses

    # ------------------------------------------------------------------ logs

    def _write_csv(self) -> None:
        if not self.is_main:
            return
        path = self.out_dir / "loss.csv"
        rows = []
        if path.exists():
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) < (self.history[0]["step"]
                                                                             if self.history else 1 << 62)]
        rows += [{k: h[k] for k in ("step", "loss", "lr", "sec_per_step")} for h in self.history]
        partial = path.with_name(path.name + ".partial")
        with open(partial, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=["step", "loss", "lr", "sec_per_step"])
            w.writeheader()
            w.writerows(rows)
        os.replace(partial, path)

    def _plot(self) -> None:
        path = self.out_dir / "loss.csv"
        if not self.is_main or not path.exists():
            return
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        if not rows:
            return
        steps, losses = [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, losses, lw=0.8, alpha=0.5, label="loss")
        if len(losses) >= 10:
            k = max(5, len(losses) // 50)
            smooth = np.convolve(losses, np.ones(k) / k, mode="valid")
            ax.plot(steps[k - 1:], smooth, lw=1.5, label=f"mean of {k}")
        ax.set_xlabel("step")
        ax.set_ylabel("flow-matching MSE")
        ax.set_yscale("log")
        ax.legend()
        fig.tight_layout()
        fig.savefig(self.out_dir / "loss.png", dpi=100)
        plt.close(fig)

    # ------------------------------------------------------------------ checkpoints

    def _state(self) -> tuple[dict[str, Tensor], dict]:
        """Full model and optimizer state on CPU (a collective under FSDP; complete on rank 0)."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        return (get_model_state_dict(self.model, options=opts),
                get_optimizer_state_dict(self.model, self.opt, options=opts))

    def save_checkpoint(self) -> Optional[Path]:
        """Write ``checkpoints/step_NNNNNNNN.safetensors`` (model, EMA, optimizer, RNG; atomically) on rank 0,
        keep the newest ``keep_checkpoints``, update the CSV and the loss plot."""
        model_sd, osd = self._state()
        ema = {n: _full(e).detach().cpu() for n, e in zip(self.param_names, self.ema)} if self.ema else {}
        path = None
        if self.is_main:
            tensors = {f"model.{k}": v for k, v in model_sd.items()}
            tensors.update({f"ema.{_strip(k)}": v for k, v in ema.items()})
            opt_tensors, opt_meta = _flatten_optimizer(osd)
            tensors.update(opt_tensors)
            rng, rng_meta = _rng_tensors()
            tensors.update(rng)
            meta = {"format": CKPT_FORMAT, "step": str(self.step), "config": json.dumps(self.cfg.to_dict()),
                    "dit_config": json.dumps(self.dit.config.to_dict()), "optimizer": json.dumps(opt_meta),
                    "rng": json.dumps(rng_meta), "world_size": str(self.world)}
            path = self.ckpt_dir / f"step_{self.step:08d}.safetensors"
            _atomic_save({k: v.detach().cpu() for k, v in tensors.items()}, path, meta)
            for old in sorted(self.ckpt_dir.glob("step_*.safetensors"))[:-self.cfg.keep_checkpoints]:
                old.unlink(missing_ok=True)
            self._write_csv()
            self._plot()
        if self.world > 1:
            dist.barrier()
        return path

    def load_checkpoint(self, path) -> int:
        """Restore model, EMA, optimizer, RNG and step from a checkpoint; returns the step."""
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                             set_optimizer_state_dict)

        from ..model.loading import read_safetensors

        tensors, meta = read_safetensors(path)
        if meta.get("format") != CKPT_FORMAT:
            raise ConfigError(f"{Path(path).name} is not an OmniSync training checkpoint.")
        model_sd = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_sd, options=opts)
        osd = _unflatten_optimizer({k: v for k, v in tensors.items() if k.startswith("optim.")},
                                   json.loads(meta["optimizer"]))
        set_optimizer_state_dict(self.model, self.opt, osd, options=opts)
        for group in self.opt.param_groups:         # the loader turns tuples into lists
            group["betas"] = tuple(group["betas"])
        if self.ema is not None:
            for i, (n, e) in enumerate(zip(self.param_names, self.ema)):
                full = tensors.get(f"ema.{_strip(n)}")
                if full is None:
                    continue
                if hasattr(e, "device_mesh"):
                    from torch.distributed.tensor import distribute_tensor

                    full = distribute_tensor(full.to(e.device), e.device_mesh, e.placements)
                with torch.no_grad():
                    e.copy_(full)
        _set_rng({k: v for k, v in tensors.items() if k.startswith("rng.")}, json.loads(meta["rng"]))
        self.step = int(meta["step"])
        self.history = []
        return self.step

    def resume(self) -> int:
        """Load the newest checkpoint in ``out_dir/checkpoints`` if there is one; returns the step."""
        path = latest_checkpoint(self.ckpt_dir)
        if path is None and self.is_main:
            log.info("no checkpoint in %s: starting from step 0", self.ckpt_dir)
        if path is None:
            return 0
        step = self.load_checkpoint(path)
        if self.is_main:
            log.info("resumed from %s (step %d)", path, step)
        return step

    # ------------------------------------------------------------------ export

    def trained_dit(self, use_ema: bool = True) -> OmniSyncDiT:
        """A plain CPU copy of the trained DiT (EMA weights when kept); a collective under FSDP."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        model_sd = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if use_ema and self.ema is not None:
            ema = {_strip(n): _full(e).detach().cpu() for n, e in zip(self.param_names, self.ema)}
            model_sd = {k: ema.get(k, v) for k, v in model_sd.items()}
        if not self.is_main:
            return None
        with torch.device("meta"):
            dit = OmniSyncDiT(self.dit.config)
        dit.load_state_dict(model_sd, strict=True, assign=True)
        return dit.eval()

    def bundle_defaults(self) -> dict:
        return bundle_defaults(self.cfg, self.dataset.size)

    def export(self) -> Optional[Path]:
        """Write the inference model (see :func:`export_bundle`) on rank 0."""
        dit = self.trained_dit()
        if not self.is_main:
            return None
        return export_bundle(self.out_dir / "model.safetensors", dit, self.codec, self.audio_encoder,
                             self.bundle_defaults(), self.cfg.codec)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool, self._pending = None, {}
        if self._own_group and dist.is_initialized():
            dist.destroy_process_group()


def bundle_defaults(cfg: TrainConfig, crop_size: int) -> dict:
    """Inference defaults a model trained with ``cfg`` on ``crop_size`` px crops ships with (the config's
    ``bundle_defaults`` win)."""
    return {"window": cfg.window, "overlap": 8 if cfg.window > 16 else 2, "crop_size": crop_size,
            "audio_before": cfg.audio_before, "audio_after": cfg.audio_after, "steps": 50, "tau": 0.92,
            "shift": 5.0, **cfg.bundle_defaults}


def dit_from_checkpoint(path, use_ema: bool = True) -> tuple[OmniSyncDiT, dict]:
    """The DiT of a training checkpoint (its EMA weights where kept, unless ``use_ema`` is False) and the
    checkpoint's metadata."""
    from ..model.loading import load_dit, read_safetensors

    tensors, meta = read_safetensors(path)
    if meta.get("format") != CKPT_FORMAT:
        raise ConfigError(f"{Path(path).name} is not an OmniSync training checkpoint.")
    state = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
    if use_ema:
        state.update({k[4:]: v for k, v in tensors.items() if k.startswith("ema.")})
    return load_dit(state, preset=DiTConfig.from_dict(json.loads(meta["dit_config"]))), meta


def _strip(name: str) -> str:
    """Parameter name without a DDP ``module.`` prefix (FSDP2 keeps the original names)."""
    return name[7:] if name.startswith("module.") else name


def _header_meta(path) -> dict:
    from safetensors import safe_open

    if not os.path.isfile(path):
        raise ConfigError(f"init_from checkpoint not found: {path}.")
    with safe_open(str(path), framework="pt") as f:
        return f.metadata() or {}


def run(config: TrainConfig, codec=None, dataset=None, audio_encoder=None) -> Trainer:
    """Build a trainer, resume if asked, train to ``config.steps``, export on rank 0; returns the trainer."""
    trainer = Trainer(config, codec=codec, dataset=dataset, audio_encoder=audio_encoder)
    try:
        if config.resume:
            trainer.resume()
        trainer.fit()
        if config.bundle:
            trainer.export()
    finally:
        trainer.close()
    return trainer


def train_main(config_path: str, resume: Optional[bool] = None) -> int:
    """CLI entry (``omnisync train --config FILE [--resume]``): returns 0, or 2 with one line on stderr for a
    bad config or data."""
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    try:
        cfg = load_config(config_path, **({} if resume is None else {"resume": bool(resume)}))
        run(cfg)
    except OmniSyncError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":      # torchrun --nproc_per_node N -m omnisync_core.train.trainer CONFIG [--resume]
    sys.exit(train_main(sys.argv[1], resume=True if "--resume" in sys.argv[2:] else None))
