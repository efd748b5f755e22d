"""One-time conversion of LatentSync's pickle checkpoints to safetensors, without ever running their code.

``latentsync_unet.pt`` is ``{"global_step": int, "state_dict": {...}}`` (upstream ``scripts/train_unet.py``
L454-459); ``whisper/tiny.pt`` is OpenAI's ``{"dims": {...}, "model_state_dict": {...}}``. Both are read with
``torch.load(weights_only=True, mmap=True)`` and nothing else: torch's weights-only unpickler builds tensors and plain
containers only and refuses any other object, so a tampered file raises instead of running code, and mmap keeps a
5 GB file out of RAM. The keys are then checked strictly against the family the file claims to be (upstream loads
with ``strict=False``, which hides missing and misnamed tensors), and the safetensors file is written beside the
source through a temporary file and a rename, one tensor at a time.
"""

from __future__ import annotations

import hashlib
import json
import pickle
import struct
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Mapping, Optional

import torch

from .. import __version__
from ..audio.whisper import WhisperEncoder, WhisperEncoderConfig
from ..fsutil import publish
from .latentsync_unet import (
    LATENTSYNC_UNET_PRESETS, is_latentsync_unet, latentsync_config_from_shapes, latentsync_unet_shapes,
)
from .loading import CheckpointError, CheckpointMismatchError, read_header, validate_state_dict

__all__ = ["convert_pickle", "describe", "ModelDescription", "EXPECT", "WHISPER_TINY_DIMS",
           "whisper_checkpoint_shapes"]

# What ``expect`` may name: a family (any config of it) or the released model (that architecture exactly).
EXPECT = ("latentsync_unet", "latentsync-1.6", "whisper", "whisper-tiny")
WHISPER_TINY_DIMS = dict(n_mels=80, n_audio_ctx=1500, n_audio_state=384, n_audio_head=6, n_audio_layer=4,
                         n_vocab=51865, n_text_ctx=448, n_text_state=384, n_text_head=6, n_text_layer=4)
_DIM_NAMES = tuple(WHISPER_TINY_DIMS)
_ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}


@dataclass
class ModelDescription:
    """What a checkpoint is: ``kind`` (``latentsync_unet`` / ``whisper`` / ``sd_vae`` / None), a one-line
    ``summary``, counts, and the ``config`` dict (of the OmniSync config dataclass) when known."""

    kind: Optional[str]
    summary: str
    num_tensors: int
    num_params: int
    config: dict = field(default_factory=dict)
    is_pickle: bool = False

    def __str__(self) -> str:
        return self.summary


# ---------------------------------------------------------------- reading a pickle safely

def _load_pickle(path: Path):
    """``torch.load(path, map_location="cpu", weights_only=True, mmap=True)``, errors made readable."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{path.name} was refused: it holds objects other than tensors and plain containers, which could run "
            f"code when unpickled, so it was not loaded ({first}).") from None
    except (RuntimeError, ValueError, EOFError, zipfile.BadZipFile, OSError) as e:
        raise CheckpointError(f"{path.name} is not a PyTorch zip checkpoint that can be memory-mapped ({e}).") from None


def _tensors_only(sd, where: str) -> dict[str, torch.Tensor]:
    if not isinstance(sd, Mapping):
        raise CheckpointError(f"{where} is a {type(sd).__name__}, not a state dict.")
    bad = [str(k) for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise CheckpointError(f"{where} holds entries that are not tensors: {', '.join(bad[:6])}.")
    return dict(sd)


def _unwrap(obj, name: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, extra plain values) from the layouts the LatentSync checkpoints use."""
    if isinstance(obj, Mapping) and "model_state_dict" in obj:
        dims = obj.get("dims")
        if not isinstance(dims, Mapping):
            raise CheckpointError(f"{name} has a model_state_dict but no Whisper 'dims'.")
        return _tensors_only(obj["model_state_dict"], f"{name}['model_state_dict']"), {"dims": dict(dims)}
    if isinstance(obj, Mapping) and "state_dict" in obj:
        extra = {k: v for k, v in obj.items() if k != "state_dict" and isinstance(v, (int, float, str))}
        return _tensors_only(obj["state_dict"], f"{name}['state_dict']"), extra
    return _tensors_only(obj, name), {}


# ---------------------------------------------------------------- families

def whisper_checkpoint_shapes(dims: Mapping[str, int]) -> dict[str, tuple]:
    """Every key of an openai/whisper ``model_state_dict`` (encoder and text decoder) with its shape."""
    enc_cfg = _encoder_config(dims)
    with torch.device("meta"):
        out = {f"encoder.{k}": tuple(v.shape) for k, v in WhisperEncoder(enc_cfg).state_dict().items()}
    d, n_mlp = dims["n_text_state"], 4 * dims["n_text_state"]
    out["decoder.token_embedding.weight"] = (dims["n_vocab"], d)
    out["decoder.positional_embedding"] = (dims["n_text_ctx"], d)
    for i in range(dims["n_text_layer"]):
        p = f"decoder.blocks.{i}."
        for a in ("attn", "cross_attn"):
            for proj in ("query", "key", "value", "out"):
                out[f"{p}{a}.{proj}.weight"] = (d, d)
                if proj != "key":
                    out[f"{p}{a}.{proj}.bias"] = (d,)
        for ln in ("attn_ln", "cross_attn_ln", "mlp_ln"):
            out[f"{p}{ln}.weight"] = out[f"{p}{ln}.bias"] = (d,)
        out.update({f"{p}mlp.0.weight": (n_mlp, d), f"{p}mlp.0.bias": (n_mlp,), f"{p}mlp.2.weight": (d, n_mlp),
                    f"{p}mlp.2.bias": (d,)})
    out["decoder.ln.weight"] = out["decoder.ln.bias"] = (d,)
    return out


def _encoder_config(dims: Mapping[str, int]) -> WhisperEncoderConfig:
    return WhisperEncoderConfig(n_mels=dims["n_mels"], n_ctx=dims["n_audio_ctx"], d_model=dims["n_audio_state"],
                                n_heads=dims["n_audio_head"], n_layers=dims["n_audio_layer"])


def _whisper_name(dims: Mapping[str, int]) -> str:
    sizes = {384: "tiny", 512: "base", 768: "small", 1024: "medium", 1280: "large"}
    size = sizes.get(dims.get("n_audio_state"), f"{dims.get('n_audio_state')}-wide")
    return f"Whisper {size} ({'multilingual' if dims.get('n_vocab', 0) >= 51865 else 'English-only'})"


def _check_whisper(sd: dict, extra: dict, name: str, exact: bool) -> tuple[dict, dict]:
    dims = extra.get("dims")
    missing = [k for k in _DIM_NAMES if not isinstance((dims or {}).get(k), int)]
    if missing:
        raise CheckpointError(f"{name}: the Whisper 'dims' lack {', '.join(missing)}.")
    dims = {k: int(dims[k]) for k in _DIM_NAMES}
    if exact and dims != WHISPER_TINY_DIMS:
        raise CheckpointError(f"{name} is {_whisper_name(dims)} with dims {dims}, not Whisper tiny multilingual "
                              f"{WHISPER_TINY_DIMS}, which LatentSync 1.6 uses.")
    report = validate_state_dict(sd, whisper_checkpoint_shapes(dims))
    if not report.ok:
        raise CheckpointMismatchError(f"{_whisper_name(dims)} checkpoint ({name})", report)
    enc = {k[len("encoder."):]: v for k, v in sd.items() if k.startswith("encoder.")}
    cfg = _encoder_config(dims)
    meta = {"kind": "whisper", "config": json.dumps(asdict(cfg)), "whisper_dims": json.dumps(dims),
            "description": f"{_whisper_name(dims)} audio encoder (text decoder dropped), converted from OpenAI's "
                           f"checkpoint format"}
    return enc, meta


def _check_unet(sd: dict, extra: dict, name: str, exact: bool) -> tuple[dict, dict]:
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    if not is_latentsync_unet(shapes):
        raise CheckpointError(f"{name} is not a LatentSync UNet (no conv_in / down_blocks / mid_block keys).")
    cfg = latentsync_config_from_shapes(shapes)
    if exact:
        cfg = LATENTSYNC_UNET_PRESETS["latentsync-1.6"]
    report = validate_state_dict(sd, latentsync_unet_shapes(cfg))
    if not report.ok:
        raise CheckpointMismatchError(f"LatentSync UNet ({name})", report)
    n = sum(v.numel() for v in sd.values())
    released = latentsync_unet_shapes("latentsync-1.6") == shapes
    meta = {"kind": "latentsync_unet", "config": json.dumps(cfg.to_dict()),
            "description": f"LatentSync UNet3D ({'the 1.5/1.6 release architecture' if released else 'a variant'}, "
                           f"{len(sd)} tensors, {n:,} parameters)"}
    meta.update({k: str(v) for k, v in extra.items()})
    return sd, meta


def _identify(sd: dict, extra: dict) -> Optional[str]:
    if "dims" in extra or "encoder.conv1.weight" in sd:
        return "whisper"
    if is_latentsync_unet({k: tuple(v.shape) for k, v in sd.items()}):
        return "latentsync_unet"
    return None


# ---------------------------------------------------------------- writing

def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def _write_safetensors(tensors: Mapping[str, torch.Tensor], path: Path, metadata: Mapping[str, str]) -> None:
    """Stream a safetensors file (header, then each tensor's bytes in key order): peak memory is one tensor."""
    header, offset, order = {}, 0, sorted(tensors)
    for k in order:
        t = tensors[k]
        if t.dtype not in _ST_DTYPES:
            raise CheckpointError(f"Tensor {k!r} has dtype {t.dtype}, which safetensors cannot store.")
        nbytes = t.numel() * t.element_size()
        header[k] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    header["__metadata__"] = dict(metadata)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for k in order:
            t = tensors[k].detach().to("cpu").contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().tobytes())


def convert_pickle(path, out=None, expect: Optional[str] = None, dtype: Optional[torch.dtype] = None) -> Path:
    """Convert a LatentSync UNet or Whisper pickle checkpoint to ``.safetensors`` beside it (or at ``out``).

    ``expect``: ``"latentsync_unet"`` / ``"whisper"`` (any config of the family, read from the shapes and dims) or
    ``"latentsync-1.6"`` / ``"whisper-tiny"`` (exactly the released models); None recognises the family by its keys.
    ``dtype`` casts floating tensors (e.g. ``torch.float16`` halves the 5 GB fp32 UNet); by default they are kept.
    Whisper keeps its audio encoder only (LatentSync never uses the text decoder), under our encoder's names, with
    its config in the metadata. The metadata also records the source file name, its sha256 and what it is. Returns
    the written path. Raises :class:`CheckpointError` (refused pickle, unknown layout) or
    :class:`CheckpointMismatchError` (keys or shapes that do not fit) and then writes nothing.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise CheckpointError(f"Checkpoint not found: {path}.")
    if expect is not None and expect not in EXPECT:
        raise CheckpointError(f"Unknown checkpoint kind {expect!r}; expect one of {', '.join(EXPECT)}.")
    sd, extra = _unwrap(_load_pickle(path), path.name)
    family = _identify(sd, extra)
    wanted = {"latentsync-1.6": "latentsync_unet", "whisper-tiny": "whisper"}.get(expect, expect)
    if family is None:
        raise CheckpointError(f"{path.name} is neither a LatentSync UNet nor a Whisper checkpoint.")
    if wanted is not None and family != wanted:
        raise CheckpointError(f"{path.name} is a {family} checkpoint, not a {wanted} one.")
    check = _check_whisper if family == "whisper" else _check_unet
    tensors, meta = check(sd, extra, path.name, exact=expect in ("latentsync-1.6", "whisper-tiny"))
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta.update(format="omnisync", source_file=path.name, source_sha256=_sha256(path), omnisync_version=__version__)
    out = Path(out).expanduser() if out is not None else path.with_suffix(".safetensors")
    if out.resolve() == path.resolve():
        raise CheckpointError(f"The output {out} would overwrite the source checkpoint.")
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    try:
        _write_safetensors(tensors, partial, meta)
        read_header(partial)   # the written header parses and matches the file size
        publish(partial, out)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return out


# ---------------------------------------------------------------- describing

def describe(path) -> ModelDescription:
    """What a checkpoint is, for ``omnisync check-model``: a safetensors file by its header alone, a pickle by
    loading it weights-only and memory-mapped (nothing else is ever unpickled). Knows the LatentSync UNet, Whisper
    and the SD VAE; ``kind`` None means none of them fit."""
    from .sd_vae import is_sd_vae, normalize_sd_vae_state_dict, sd_vae_config_from_shapes

    path = Path(path).expanduser()
    with open(path, "rb") as f:
        head = f.read(9)
    is_pickle = not (len(head) == 9 and head[8:9] == b"{")   # a safetensors file: 8-byte length, then its JSON
    extra: dict = {}
    if is_pickle:
        sd, extra = _unwrap(_load_pickle(path), path.name)
        shapes = {k: tuple(v.shape) for k, v in sd.items()}
        meta = {}
    else:
        info, meta = read_header(path)
        shapes = {k: v.shape for k, v in info.items()}
    n = sum(torch.Size(s).numel() for s in shapes.values())
    base = dict(num_tensors=len(shapes), num_params=n, is_pickle=is_pickle)
    prefix = "model.diffusion_model."
    stripped = {k[len(prefix):]: s for k, s in shapes.items() if k.startswith(prefix)}
    unet_shapes = stripped or shapes
    if is_latentsync_unet(unet_shapes):
        cfg = latentsync_config_from_shapes(unet_shapes)
        released = latentsync_unet_shapes("latentsync-1.6") == unet_shapes
        what = "LatentSync 1.5/1.6 UNet" if released else "LatentSync UNet variant"
        return ModelDescription("latentsync_unet", f"{what} ({n / 1e9:.2f}B parameters)", config=cfg.to_dict(), **base)
    if meta.get("kind") == "whisper" or "dims" in extra or "encoder.conv1.weight" in shapes or "conv1.weight" in shapes:
        dims = extra.get("dims") or json.loads(meta.get("whisper_dims", "{}"))
        name = _whisper_name(dims) if dims else "Whisper encoder"
        return ModelDescription("whisper", f"{name} ({n / 1e6:.1f}M parameters)", config=dict(dims), **base)
    if is_sd_vae(shapes):
        cfg = sd_vae_config_from_shapes(normalize_sd_vae_state_dict({k: torch.empty(s, device="meta")
                                                                     for k, s in shapes.items()}))
        return ModelDescription("sd_vae", f"SD KL-f8 VAE ({n / 1e6:.1f}M parameters)", config=cfg.to_dict(), **base)
    return ModelDescription(None, f"not a LatentSync UNet, Whisper or SD VAE checkpoint ({len(shapes)} tensors)",
                            **base)
