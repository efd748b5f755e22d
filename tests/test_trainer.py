"""Trainer: flow-matching loss, audio dropout, checkpoints, exact resume, and DDP / FSDP2 on gloo (CPU)."""

from __future__ import annotations

import csv
import os
import shutil
import socket

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file, save_file

from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from omnisync_core.train.config import CODECS, ConfigError, load_config, register_codec
from omnisync_core.train.data import LipSyncDataset, synthetic_shards
from omnisync_core.train.trainer import Trainer, latest_checkpoint, train_main

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng is not installed")
WINDOW = 9


class SpaceToDepthCodec(nn.Module):
    """Stand-in codec with the WanVAE latent layout: frame 0 alone, then groups of 4 frames averaged, 8x8
    space-to-depth (192 values) and a fixed orthonormal projection to ``channels``."""

    def __init__(self, channels: int = 8):
        super().__init__()
        q, _ = torch.linalg.qr(torch.randn(192, 192, generator=torch.Generator().manual_seed(0)))
        self.register_buffer("proj", q[:channels].contiguous())

    def encode(self, video):
        b, c, t, h, w = video.shape
        rest = video[:, :, 1:].reshape(b, c, (t - 1) // 4, 4, h, w).mean(3)
        x = torch.cat([video[:, :, :1], rest], 2).transpose(1, 2).flatten(0, 1)
        z = torch.einsum("nchw,kc->nkhw", F.pixel_unshuffle(x, 8), self.proj)
        return 4 * z.unflatten(0, (b, -1)).transpose(1, 2)

    def decode(self, z):
        b, k, t = z.shape[:3]
        x = torch.einsum("nkhw,kc->nchw", (z / 4).transpose(1, 2).flatten(0, 1), self.proj)
        x = F.pixel_shuffle(x, 8).unflatten(0, (b, t)).transpose(1, 2)
        return torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(4, 2)], 2)


register_codec("test-s2d", lambda options: SpaceToDepthCodec(int(options.get("channels", 8))))


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models on a shared 2-core machine: one thread avoids OpenMP contention (10x faster here)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    torch.manual_seed(0)
    encoder = WhisperEncoder(WhisperEncoderConfig(d_model=32, n_heads=2, n_layers=1)).eval()
    out = tmp_path_factory.mktemp("shards")
    synthetic_shards(out, 2, size=32, seed=5, sentences=["Hello there, how are you today?"], audio_encoder=encoder,
                     shard_size=1)
    return out


def _config(out_dir, **kw):
    base = {"out_dir": str(out_dir), "codec": "test-s2d", "window": WINDOW, "batch_size": 2, "lr": 1e-3,
            "warmup": 0, "steps": 4, "checkpoint_every": 2, "log_every": 1, "model_overrides": {"text_len": 4},
            "audio_dropout": 0.0, "bundle": False}
    base.update(kw)
    return load_config(base)


def _trainer(shards, out_dir, **kw) -> Trainer:
    cfg = _config(out_dir, **kw)
    ds = LipSyncDataset(shards, window=WINDOW)
    return Trainer(cfg, dataset=ds)


def test_overfit_one_batch_loss_decreases(shards, tmp_path):
    tr = _trainer(shards, tmp_path, lr=3e-3, grad_clip=0.0)
    fixed = tr.local_batch(0)
    tr.local_batch = lambda step: fixed
    losses = [tr.train_step() for _ in range(30)]
    assert losses[-1] < 0.5 * losses[0], losses[::5]
    assert sum(losses[-5:]) < sum(losses[:5])


def test_audio_dropout_masks_rows(shards, tmp_path):
    tr = _trainer(shards, tmp_path, audio_dropout=0.5, batch_size=8)
    keep = torch.cat([tr.local_batch(s)["keep"] for s in range(4)])
    assert 0.25 < keep.float().mean() < 0.75
    b = tr.local_batch(0)
    assert b["keep"].any() and (~b["keep"]).any()
    dit = tr.dit.eval()
    with torch.no_grad():
        for blk in dit.blocks:          # the audio branch and head start at zero: give them weights
            nn.init.normal_(blk.audio_attn.o.weight, std=0.2)
        nn.init.normal_(dit.head.head.weight, std=0.2)
        x, s = b["z0"] * 0.5 + b["eps"] * 0.5, b["sigma"]
        masked = dit(x, s, source=b["z_src"], audio=b["audio"], audio_mask=b["keep"])
        silent = dit(x, s, source=b["z_src"], audio=None)
        full = dit(x, s, source=b["z_src"], audio=b["audio"])
    drop = ~b["keep"]
    torch.testing.assert_close(masked[drop], silent[drop], rtol=0, atol=1e-6)
    torch.testing.assert_close(masked[b["keep"]], full[b["keep"]], rtol=0, atol=1e-6)
    assert (full[drop] - silent[drop]).abs().max() > 1e-3


def test_gradient_checkpointing_gives_the_same_gradients(shards, tmp_path):
    plain = _trainer(shards, tmp_path / "plain")
    ckpt = _trainer(shards, tmp_path / "ckpt", grad_checkpointing=True)
    assert ckpt.dit.gradient_checkpointing and not plain.dit.gradient_checkpointing
    assert plain.loss_and_grads(0) == ckpt.loss_and_grads(0)
    for (name, a), b in zip(_grads(plain).items(), _grads(ckpt).values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_checkpoint_round_trip(shards, tmp_path):
    tr = _trainer(shards, tmp_path, ema_decay=0.9)
    for _ in range(2):
        tr.train_step()
    path = tr.save_checkpoint()
    assert path.name == "step_00000002.safetensors" and latest_checkpoint(tmp_path / "checkpoints") == path
    assert not list((tmp_path / "checkpoints").glob("*.partial"))
    rng_after = torch.rand(4)
    other = _trainer(shards, tmp_path / "other", ema_decay=0.9)
    assert other.load_checkpoint(path) == 2
    for (n, a), b in zip(tr.dit.state_dict().items(), other.dit.state_dict().values()):
        assert torch.equal(a, b), n
    for a, b in zip(tr.ema, other.ema):
        assert torch.equal(a, b)
    sa, sb = tr.opt.state_dict(), other.opt.state_dict()
    for i in sa["state"]:
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][i][k], sb["state"][i][k])
    assert sa["param_groups"][0]["betas"] == sb["param_groups"][0]["betas"]
    assert torch.equal(torch.rand(4), rng_after)    # the global torch RNG is back where the save left it
    rows = list(csv.DictReader(open(tmp_path / "loss.csv")))
    assert [int(r["step"]) for r in rows] == [1, 2] and (tmp_path / "loss.png").stat().st_size > 1000


def test_resume_continues_the_identical_loss_curve(shards, tmp_path):
    straight = _trainer(shards, tmp_path / "a", ema_decay=0.95)
    full = straight.fit()
    first = _trainer(shards, tmp_path / "b", ema_decay=0.95, steps=2)
    first.fit()
    resumed = _trainer(shards, tmp_path / "b", ema_decay=0.95, steps=4)
    assert resumed.resume() == 2
    tail = resumed.fit()
    assert tail == full[2:], (tail, full)
    for a, b in zip(straight.dit.state_dict().values(), resumed.dit.state_dict().values()):
        assert torch.equal(a, b)
    curve = lambda d: [float(r["loss"]) for r in csv.DictReader(open(d / "loss.csv"))]  # noqa: E731
    assert curve(tmp_path / "b") == curve(tmp_path / "a") == pytest.approx(full, abs=0)


def test_train_main_and_bad_configs(shards, tmp_path, capsys):
    cfg = tmp_path / "train.toml"
    cfg.write_text(f'out_dir = "run"\ncodec = "test-s2d"\ndata_dirs = ["{shards}"]\nwindow = {WINDOW}\n'
                   'steps = 2\ncheckpoint_every = 2\nbatch_size = 1\n[model_overrides]\ntext_len = 4\n')
    assert train_main(str(cfg)) == 0
    assert (tmp_path / "run" / "checkpoints" / "step_00000002.safetensors").is_file()
    assert (tmp_path / "run" / "dit.safetensors").is_file()   # stand-in codec: the DiT alone, with a warning
    bad = tmp_path / "bad.toml"
    bad.write_text('window = 8\n')
    assert train_main(str(bad)) == 2
    assert "4k+1" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="Unknown training config keys: bogus"):
        load_config({"bogus": 1})
    with pytest.raises(ConfigError, match="Unknown codec"):
        Trainer(load_config({"codec": "nope", "data_dirs": [str(shards)], "window": WINDOW,
                             "out_dir": str(tmp_path / "nope")}))
    with pytest.raises(ConfigError, match="Unknown model_overrides keys"):
        _trainer(shards, tmp_path / "bad", model_overrides={"ema_decay": 0.9})
    assert "wan-vae" in CODECS


# ---------------------------------------------------------------------------------------------- distributed


def _grads(trainer: Trainer) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in trainer.model.named_parameters():
        g = p.grad
        g = g.full_tensor() if hasattr(g, "full_tensor") else g
        out[name[7:] if name.startswith("module.") else name] = g.detach().clone()
    return out


def _worker(rank: int, world: int, port: int, shards, out_dir, strategies):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    import torch.distributed as dist

    for strategy in strategies:
        tr = _trainer(shards, f"{out_dir}/{strategy}", distributed=strategy)
        loss = tr.loss_and_grads(0)
        grads = _grads(tr)
        items = torch.tensor([[i, seed] for i, _, seed in tr.sampler.shard(0, rank, world)])
        save_file({"items": items}, f"{out_dir}/{strategy}_items_{rank}.safetensors")
        if rank == 0:
            grads["__loss__"] = torch.tensor([loss], dtype=torch.float64)
            save_file(grads, f"{out_dir}/{strategy}.safetensors")
        tr.optimizer_step(0)       # the sharded optimizer step runs too
    dist.barrier()
    dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ddp_and_fsdp2_on_gloo_match_one_process(shards, tmp_path):
    import torch.multiprocessing as mp

    strategies = ("ddp", "fsdp")
    mp.spawn(_worker, args=(2, _free_port(), str(shards), str(tmp_path), strategies), nprocs=2, join=True)
    single = _trainer(shards, tmp_path / "single")
    loss = single.loss_and_grads(0)
    reference = _grads(single)
    everything = torch.tensor([[i, seed] for i, _, seed in single.sampler.batch(0)])
    for strategy in strategies:
        # each rank computed its own half of the batch, and the halves make up the whole batch
        parts = [load_file(tmp_path / f"{strategy}_items_{r}.safetensors")["items"] for r in range(2)]
        assert [len(p) for p in parts] == [1, 1] and torch.equal(torch.cat(parts), everything)
        got = load_file(tmp_path / f"{strategy}.safetensors")
        assert float(got.pop("__loss__")) == pytest.approx(loss, abs=1e-6), strategy
        assert got.keys() == reference.keys()
        for name, g in reference.items():
            torch.testing.assert_close(got[name], g, rtol=1e-5, atol=1e-5, msg=f"{strategy} {name}")


def test_latent_cache_gives_the_same_losses(shards, tmp_path):
    plain = _trainer(shards, tmp_path / "plain", steps=3, checkpoint_every=10).fit()
    cached = _trainer(shards, tmp_path / "cached", steps=3, checkpoint_every=10, cache_latents=True)
    assert cached.fit() == plain and len(cached._cache) > 0


def test_wan_vae_run_exports_a_loadable_bundle(shards, tmp_path):
    from omnisync_core.model.bundle import load_bundle
    from omnisync_core.model.vae import WanVAE

    torch.manual_seed(0)
    whisper = WhisperEncoder(WhisperEncoderConfig(d_model=32, n_heads=2, n_layers=1)).eval()
    cfg = _config(tmp_path, codec="wan-vae", codec_options={"preset": "tiny"}, steps=1, batch_size=1,
                  ema_decay=0.5, bundle=True)
    tr = Trainer(cfg, dataset=LipSyncDataset(shards, window=WINDOW), audio_encoder=whisper)
    assert isinstance(tr.codec, WanVAE) and tr.dit.config.in_dim == 16 and tr.dit.config.audio_dim == 32
    tr.fit()
    path = tr.export()
    bundle = load_bundle(path)
    assert bundle.defaults["crop_size"] == 32 and bundle.defaults["window"] == WINDOW
    ema = dict(zip([n for n in tr.param_names], tr.ema))
    for name, value in bundle.dit.state_dict().items():
        expected = ema.get(name, tr.dit.state_dict()[name])
        assert torch.equal(value, expected), name       # the bundle holds the EMA weights
    for a, b in zip(bundle.vae.state_dict().values(), tr.codec.state_dict().values()):
        assert torch.equal(a, b)


def test_mouth_loss_weights_mark_the_mouth_of_each_latent_frame():
    from omnisync_core.train.trainer import mouth_loss_weights

    n, size = 5, 32
    mouth = torch.tensor([[8.0, 20.0]] * 3 + [[24.0, 20.0]] * 2)          # the mouth moves right at frame 3
    sample = {"video": torch.zeros(3, n, size, size), "mouth_xy": mouth, "face_width": torch.full((n,), 16.0)}
    w = mouth_loss_weights([sample, {"video": sample["video"]}], (2, 4, n, 8, 8), 3.0)
    assert w.shape == (2, 1, n, 8, 8)
    assert w[0, 0, 0, 5, 2] == 4.0 and w[0, 0, 0, 5, 6] == 1.0          # latent cell (x=2, y=5) holds the mouth
    assert w[0, 0, 4, 5, 6] == 4.0 and w[0, 0, 4, 5, 2] == 1.0
    assert w[0, 0, :, 0].eq(1).all() and w[1].eq(1).all()               # far rows, and a sample with no mouth


def test_pixel_codec_run_with_mouth_weighting_exports_a_half_precision_bundle(shards, tmp_path):
    from omnisync_core.generator import OmniSyncGenerator, SamplerOptions
    from omnisync_core.model.bundle import load_bundle, save_bundle
    from omnisync_core.model.pixel_codec import PixelCodec

    torch.manual_seed(0)
    whisper = WhisperEncoder(WhisperEncoderConfig(d_model=32, n_heads=2, n_layers=1)).eval()
    cfg = _config(tmp_path, codec="pixel", codec_options={"spatial_factor": 4, "scale": 0.5}, steps=2,
                  mouth_loss_weight=4.0, bundle=True)
    tr = Trainer(cfg, dataset=LipSyncDataset(shards, window=WINDOW), audio_encoder=whisper)
    assert isinstance(tr.codec, PixelCodec)
    assert tr.dit.config.in_dim == 48 and tr.dit.config.temporal_compression == 1
    batch = tr.local_batch(0)
    assert batch["weight"].shape == (2, 1, WINDOW, 8, 8) and batch["weight"].max() == 5.0
    losses = tr.fit()
    assert all(torch.isfinite(torch.tensor(losses)))
    bundle = load_bundle(tr.export())
    assert isinstance(bundle.vae, PixelCodec) and bundle.vae.config.scale == 0.5

    small = save_bundle(tmp_path / "half.safetensors", bundle.dit, bundle.vae, bundle.audio_encoder,
                        defaults=bundle.defaults, dtype=torch.float16)
    half = load_bundle(small)
    assert half.dit.blocks[0].ffn[0].weight.dtype == torch.float32        # loads back in float32
    assert torch.allclose(half.audio_encoder.positional_embedding, bundle.audio_encoder.positional_embedding,
                          atol=1e-6)                                       # recomputed, not stored
    crops = torch.rand(WINDOW, 32, 32, 3)
    audio = torch.randn(WINDOW, 5, 32)
    mouth, width = torch.full((WINDOW, 2), 16.0), torch.full((WINDOW,), 14.0)
    outs = [OmniSyncGenerator(b.dit, b.vae, SamplerOptions(steps=6)).edit(crops, audio, mouth, width, seed=1)
            for b in (bundle, half)]
    assert outs[0].shape == crops.shape and (outs[0] - outs[1]).abs().max() < 0.02
