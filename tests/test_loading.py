"""Checkpoint I/O: safetensors round trips, pickle refusal, corrupt files, validation reports, Wan base import,
meta-device construction, models-folder guard, device/dtype selection."""

import json
import pickle
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from omnisync_core import __version__
from omnisync_core.audio.whisper import WhisperEncoder, WhisperEncoderConfig
from omnisync_core.errors import InputError
from omnisync_core.model import loading
from omnisync_core.model.dit import OmniSyncDiT, get_config
from omnisync_core.model.loading import (
    CheckpointError, CheckpointMismatchError, PickleCheckpointError, load_dit, load_vae, load_whisper,
    omnisync_from_wan, read_safetensors, resolve_device, resolve_dtype, resolve_model_path, save_model,
)
from omnisync_core.model.vae import WanVAE
from omnisync_core.model.wan_keys import wan_to_diffusers

TINY_WHISPER = WhisperEncoderConfig(n_mels=80, n_ctx=32, d_model=64, n_heads=2, n_layers=2)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


MISALIGNED_RUN = __import__("os").environ.get("OMNISYNC_TEST_MISALIGNED_WEIGHTS") == "1"


def assert_same_math(got, want):
    """A loaded model computes what the original computes. Not bit for bit: the two hold equal weights in different
    allocations, and CPU kernels may take another code path (vectorised head and tail loops) for another alignment,
    which changes the float summation order. 1e-6 of the output's scale is far below any real loading mistake (a
    wrong, transposed or missing tensor changes outputs at the 1e-1 level)."""
    scale = want.abs().max()
    assert scale > 0
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6 * float(scale))


def assert_same_weights(loaded, original):
    """Loading copies the stored numbers exactly (a copy is bit-exact whatever the storage)."""
    want = original.state_dict()
    for name, tensor in loaded.state_dict().items():
        assert torch.equal(tensor.float(), want[name].float()), name


def randomize(module, seed):
    """Noise in every parameter (norm gains around 1), so zero-initialised layers do not hide errors."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            noise = torch.randn(p.shape, generator=g) * 0.05
            p.copy_(noise + 1 if ("norm" in name or "ln" in name or "gamma" in name) and p.ndim <= 4 else noise)
    return module.eval()


def tiny_dit(seed=0, **overrides):
    model = randomize(OmniSyncDiT(get_config("tiny", **overrides)), seed)
    model.set_text_context(torch.randn(1, 5, model.config.text_dim, generator=torch.Generator().manual_seed(9)))
    return model


def dit_inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, 16, 2, 4, 6, generator=g)
    return dict(x=x, sigma=torch.tensor([0.7]), source=torch.randn(x.shape, generator=g),
                audio=torch.randn(1, 5, cfg.audio_window, cfg.audio_dim, generator=g))


# ---------------------------------------------------------------- round trips

def test_dit_roundtrip_with_metadata(tmp_path):
    model = tiny_dit()
    path = save_model(model, tmp_path / "dit.safetensors", "dit", extra_metadata={"note": "test"})
    assert not (tmp_path / "dit.safetensors.partial").exists()
    sd, meta = read_safetensors(path)
    assert meta["format"] == "omnisync" and meta["kind"] == "dit" and meta["omnisync_version"] == __version__
    assert meta["note"] == "test" and json.loads(meta["config"]) == model.config.to_dict()
    assert "text_context" in sd
    loaded = load_dit(path)
    assert loaded.config == model.config and not loaded.training
    assert_same_weights(loaded, model)
    inp = dit_inputs(model.config)
    with torch.no_grad():
        assert_same_math(loaded(**inp), model(**inp))
    half = load_dit(path, dtype="bf16")
    assert half.blocks[0].ffn[0].weight.dtype == torch.bfloat16


def test_vae_roundtrip(tmp_path):
    vae = randomize(WanVAE("tiny"), seed=3)
    path = save_model(vae, tmp_path / "vae.safetensors", "vae")
    loaded = load_vae(path)
    assert loaded.config == vae.config and read_safetensors(path)[1]["kind"] == "vae"
    video = torch.rand(1, 3, 5, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert_same_weights(loaded, vae)
    with torch.no_grad():
        assert_same_math(loaded.encode(video), vae.encode(video))
    with pytest.raises(CheckpointError, match="is an OmniSync vae checkpoint, not a dit one"):
        load_dit(path)


def test_whisper_roundtrip(tmp_path):
    enc = randomize(WhisperEncoder(TINY_WHISPER), seed=4)
    path = save_model(enc, tmp_path / "whisper.safetensors", "whisper")
    loaded = load_whisper(path)
    assert loaded.config == TINY_WHISPER  # 2 heads from the metadata (shape inference would say 64 / 64 = 1)
    mel = torch.randn(2, 80, 40, generator=torch.Generator().manual_seed(1))
    assert_same_weights(loaded, enc)
    with torch.no_grad():
        assert_same_math(loaded(mel), enc(mel))


@pytest.mark.skipif(MISALIGNED_RUN, reason="this run places loaded weights at odd offsets on purpose")
@pytest.mark.parametrize("dtype", [None, torch.float16, torch.bfloat16])
def test_loaded_tensors_own_aligned_storage(tmp_path, dtype):
    """No loaded tensor is a view into the file's bytes: each has a fresh, contiguous, 64-byte aligned allocation
    (the header length puts safetensors' own tensors at arbitrary offsets), in every dtype a caller asks for."""
    model = tiny_dit()
    path = save_model(model, tmp_path / "dit.safetensors", "dit")
    with open(path, "rb") as f:      # the data section starts at an offset that is not a multiple of 64 here
        assert (8 + struct.unpack("<Q", f.read(8))[0]) % 64 != 0
    sd, _ = read_safetensors(path, dtype=dtype)
    loaded = load_dit(path, dtype=dtype)
    for name, t in [*sd.items(), *loaded.state_dict().items()]:
        assert t.is_contiguous() and t.storage_offset() == 0, name
        assert t.untyped_storage().nbytes() == t.nbytes and t.data_ptr() % 64 == 0, name
    assert len({t.data_ptr() for t in sd.values()}) == len(sd)
    streamed = dict(loading.iter_safetensors(path, dtype=dtype, keys=["head.head.weight", "text_context"]))
    assert sorted(streamed) == ["head.head.weight", "text_context"]
    header, meta = loading.read_header(path)
    assert meta["kind"] == "dit" and header["head.head.weight"].shape == tuple(sd["head.head.weight"].shape)
    assert header["head.head.weight"].dtype == "F32"


def test_shared_and_view_tensors_are_saved(tmp_path):
    base = torch.arange(12.0)
    sd = {"a": base, "tied": base, "view": base[2:6], "t": base.view(3, 4).t()}
    cfg = {"dummy": 1}
    read, _ = read_safetensors(save_model(sd, tmp_path / "s.safetensors", "vae", config=cfg))
    assert all(torch.equal(read[k], v) for k, v in sd.items())


def test_atomic_write(tmp_path, monkeypatch):
    path = tmp_path / "dit.safetensors"
    save_model(tiny_dit(seed=1), path, "dit")
    before = path.read_bytes()

    def broken_save(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(loading.st, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_model(tiny_dit(seed=2), path, "dit")
    assert path.read_bytes() == before and not (tmp_path / "dit.safetensors.partial").exists()
    with pytest.raises(OSError):
        save_model(tiny_dit(), tmp_path / "new.safetensors", "dit")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dit.safetensors"]
    monkeypatch.undo()
    with pytest.raises(CheckpointError, match="'bad': it is a str"):
        save_model({"w": torch.zeros(2), "bad": "x"}, tmp_path / "bad.safetensors", "dit", config={})
    assert not (tmp_path / "bad.safetensors").exists() and not (tmp_path / "bad.safetensors.partial").exists()


# ---------------------------------------------------------------- refusing pickles and corrupt files

class Bomb:
    """Unpickling this creates a marker file: proof that a loader ran pickle."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


def test_pickle_checkpoints_are_refused_and_never_unpickled(tmp_path):
    control = tmp_path / "control"
    pickle.loads(pickle.dumps(Bomb(control))).close()
    assert control.exists()  # the bomb works when unpickled

    marker = tmp_path / "marker"
    payload = {"patch_embedding.weight": torch.zeros(2), "bomb": Bomb(marker)}
    files = [tmp_path / "model.pt", tmp_path / "renamed.safetensors", tmp_path / "legacy.safetensors",
             tmp_path / "plain.bin", tmp_path / "proto5.safetensors"]
    torch.save(payload, files[0])
    files[1].write_bytes(files[0].read_bytes())
    torch.save(payload, files[2], _use_new_zipfile_serialization=False)
    files[3].write_bytes(pickle.dumps(payload, protocol=2))
    files[4].write_bytes(pickle.dumps(payload, protocol=5))
    assert files[1].read_bytes()[:4] == b"PK\x03\x04" and files[2].read_bytes()[:1] == b"\x80"
    for f in files:
        for load in (read_safetensors, load_dit, load_vae, load_whisper, omnisync_from_wan):
            with pytest.raises(PickleCheckpointError, match="convert it to safetensors") as err:
                load(f)
            assert f.name in str(err.value)
    assert not marker.exists()


def test_corrupt_files_give_one_clear_error(tmp_path):
    good = save_model(tiny_dit(), tmp_path / "good.safetensors", "dit").read_bytes()
    cases = {
        "half.safetensors": (good[: len(good) // 2], "truncated or corrupt: tensor '"),
        "head.safetensors": (good[:40], "truncated or corrupt: its safetensors header claims"),
        "garbage.safetensors": (b"this is not a model at all " * 20, "not a safetensors file"),
        "badjson.safetensors": (struct.pack("<Q", 12) + b"{not json!!}" + b"\0" * 16, "header is not valid JSON"),
        "offsets.safetensors": (struct.pack("<Q", 80) + json.dumps(
            {"w": {"dtype": "F32", "shape": [4], "data_offsets": [0, 16]}}).encode().ljust(80) + b"\0" * 8,
            "tensor 'w' lies at bytes 0..16 but the data section has only 8 bytes"),
        "empty.safetensors": (b"", "not a safetensors file"),
    }
    for name, (data, message) in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(CheckpointError, match=message):
            load_dit(tmp_path / name)
    with pytest.raises(CheckpointError, match="Checkpoint not found"):
        read_safetensors(tmp_path / "nope.safetensors")
    with pytest.raises(CheckpointError, match="is a folder"):
        read_safetensors(tmp_path)


def test_validation_report_names_keys_and_preset(tmp_path):
    model = tiny_dit()
    sd = model.state_dict()
    missing = {k: v for k, v in sd.items() if k != "blocks.1.ffn.0.bias"}
    path = save_model(missing, tmp_path / "m.safetensors", "dit", config=model.config)
    with pytest.raises(CheckpointMismatchError, match=r"1 missing: blocks\.1\.ffn\.0\.bias") as err:
        load_dit(path)
    assert "look like preset 'tiny'" in str(err.value) and err.value.report.missing == ["blocks.1.ffn.0.bias"]

    with pytest.raises(CheckpointMismatchError, match=r"1 unexpected: blocks\.0\.extra\.weight") as err:
        load_dit({**sd, "blocks.0.extra.weight": torch.zeros(3)}, preset="tiny")
    assert "preset 'tiny'" in str(err.value)

    wrong = dict(sd, **{"blocks.0.ffn.0.weight": torch.zeros(96, 64)})
    with pytest.raises(CheckpointMismatchError,
                       match=r"blocks\.0\.ffn\.0\.weight: got \(96, 64\) vs expected \(128, 64\)") as err:
        load_dit(wrong, preset="tiny")
    assert err.value.report.mismatched and not err.value.report.missing

    with pytest.raises(CheckpointMismatchError, match="preset 'tiny' as a Wan2.1 base"):
        load_dit(tiny_dit(enable_audio=False, source_concat=False).state_dict(), preset="tiny")

    vae_sd = randomize(WanVAE("tiny"), 0).state_dict()
    vae_sd.pop("decoder.head.2.bias")
    with pytest.raises(CheckpointMismatchError, match=r"missing: decoder\.head\.2\.bias.*VAE preset 'tiny'"):
        load_vae(vae_sd)


# ---------------------------------------------------------------- Wan base import, meta init

@pytest.mark.parametrize("layout", ["wan", "diffusers"])
def test_omnisync_from_wan_file_equals_base(tmp_path, layout):
    base = tiny_dit(seed=5, enable_audio=False, source_concat=False)
    text = base.text_context
    sd = {k: v for k, v in base.state_dict().items() if k != "text_context"}
    path = tmp_path / f"wan_{layout}.safetensors"
    save_file(wan_to_diffusers(sd) if layout == "diffusers" else sd, str(path))  # a plain release: no metadata
    model = omnisync_from_wan(path)
    c = model.config
    assert c.enable_audio and c.source_concat and c.in_dim == 16 and c.dim == 64 and c.num_heads == 2
    assert model.patch_embedding.weight[:, 16:].abs().max() == 0
    assert all(b.audio_attn.o.weight.abs().max() == 0 for b in model.blocks)
    assert model.blocks[0].audio_attn.q.weight.abs().max() > 0  # other new parameters get a normal init
    inp = dit_inputs(c)
    with torch.no_grad():
        want = base(inp["x"], inp["sigma"], text=text)
        for kwargs in (inp, dict(inp, audio=torch.randn_like(inp["audio"]), source=-inp["source"])):
            assert_same_math(model(**kwargs, text=text), want)
    out = save_model(model, tmp_path / "omni.safetensors", "dit")
    with pytest.raises(CheckpointError, match="already an OmniSync checkpoint"):
        omnisync_from_wan(out)


def test_loading_builds_on_meta_without_random_init(tmp_path, monkeypatch):
    """Asserted: every nn.init call made while loading hits a meta tensor (no real random init), the loaded
    parameters are the very tensors of the state dict (zero copy), and a wan2.1-1.3b skeleton loads a meta state
    dict in seconds with its config inferred from the shapes."""
    path = save_model(tiny_dit(), tmp_path / "dit.safetensors", "dit")
    devices = []

    def spy(fn):
        def wrapped(tensor, *args, **kwargs):
            devices.append(tensor.device.type)
            return fn(tensor, *args, **kwargs)
        return wrapped

    for name in ("xavier_uniform_", "normal_", "zeros_", "ones_", "kaiming_uniform_", "uniform_"):
        monkeypatch.setattr(torch.nn.init, name, spy(getattr(torch.nn.init, name)))
    model = load_dit(path)
    assert devices and set(devices) == {"meta"}
    assert not any(p.is_meta for p in model.parameters())
    monkeypatch.undo()

    sd = tiny_dit().state_dict()
    same = load_dit(sd)
    assert same.blocks[1].ffn[2].weight.data_ptr() == sd["blocks.1.ffn.2.weight"].data_ptr()

    with torch.device("meta"):
        big = OmniSyncDiT(get_config("wan2.1-1.3b")).state_dict()
    start = time.perf_counter()
    skeleton = load_dit(big)
    assert time.perf_counter() - start < 20 and skeleton.config == get_config("wan2.1-1.3b")
    big.pop("blocks.29.audio_attn.o.weight")
    with pytest.raises(CheckpointMismatchError, match="look like preset 'wan2.1-1.3b'"):
        load_dit(big, preset="wan2.1-1.3b")


# ---------------------------------------------------------------- models folder, device, dtype

def test_resolve_model_path(tmp_path):
    root, other = tmp_path / "models", tmp_path / "elsewhere"
    (root / "dit").mkdir(parents=True)
    other.mkdir()
    (root / "dit" / "a.safetensors").write_bytes(b"x")
    (other / "secret.safetensors").write_bytes(b"x")
    (root / "dit" / "out.safetensors").symlink_to(other / "secret.safetensors")
    (root / "dit" / "alias.safetensors").symlink_to(root / "dit" / "a.safetensors")
    want = (root / "dit" / "a.safetensors").resolve()
    assert resolve_model_path("dit/a.safetensors", [other, root]) == want
    assert resolve_model_path(str(want), [root]) == want
    assert resolve_model_path("dit/alias.safetensors", [root]) == want
    assert resolve_model_path("dit/../dit/a.safetensors", [root]) == want
    for bad in ("../elsewhere/secret.safetensors", str(other / "secret.safetensors"), "dit/out.safetensors",
                "/etc/passwd", "dit/../../elsewhere/secret.safetensors"):
        with pytest.raises(CheckpointError, match="path outside the models folder"):
            resolve_model_path(bad, [root])
    with pytest.raises(CheckpointError, match="was not found"):
        resolve_model_path("dit/missing.safetensors", [root])


def test_resolve_device_and_dtype_on_cpu():
    assert resolve_device("cpu") == torch.device("cpu")
    auto = resolve_device("auto")
    if not torch.cuda.is_available() and not torch.backends.mps.is_available():
        assert auto == torch.device("cpu")
        with pytest.raises(InputError, match="CUDA is not available"):
            resolve_device("cuda")
    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("bf16", "cpu") == torch.bfloat16 and resolve_dtype("FP16") == torch.float16
    assert resolve_dtype("fp32") == torch.float32 and resolve_dtype(torch.bfloat16) == torch.bfloat16
    with pytest.raises(InputError, match="Unknown dtype 'int8'"):
        resolve_dtype("int8")
    with pytest.raises(InputError, match="Unknown device"):
        resolve_device("gpu0")
