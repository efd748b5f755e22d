"""Safe checkpoint I/O: safetensors only, meta-device construction, key/shape validation, path guards.

Checkpoint convention: the safetensors ``__metadata__`` holds ``format = "omnisync"``, ``kind`` (``dit``, ``vae``
or ``whisper``), ``config`` (JSON of the config dataclass) and ``omnisync_version``. Files without it (e.g. a Wan2.1
release) load too: the config is then taken from a preset or inferred from the tensor shapes.

Pickle-based checkpoints (``.pt``, ``.pth``, ``.ckpt``, ``.bin``, also renamed) are refused by their content and
are never unpickled: unpickling can run arbitrary code.
"""

from __future__ import annotations

import json
import os
import re
import struct
from dataclasses import asdict, dataclass, field, is_dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Mapping

import torch
import torch.nn as nn
from safetensors import SafetensorError, safe_open
from safetensors import torch as st

from .. import __version__
from ..audio.whisper import (
    WHISPER_PRESETS, WhisperEncoder, WhisperEncoderConfig, infer_whisper_config, sinusoids, to_openai_whisper_encoder,
    whisper_encoder_keys,
)
from ..errors import InputError
from ..fsutil import publish
from .dit import DIT_PRESETS, DiTConfig, OmniSyncDiT, WeightsError, get_config
from .vae import WanVAE, WanVAEConfig
from .vae_keys import diffusers_to_wan_vae, is_diffusers_vae
from .wan_keys import normalize_wan_state_dict

__all__ = [
    "CheckpointError", "PickleCheckpointError", "CheckpointMismatchError", "ValidationReport", "TensorInfo",
    "read_header", "iter_safetensors", "read_safetensors",
    "save_model", "load_dit", "omnisync_from_wan", "load_vae", "load_whisper", "infer_dit_config",
    "validate_state_dict", "resolve_device", "resolve_dtype", "resolve_model_path",
]

KINDS = ("dit", "vae", "whisper", "bundle")
PICKLE_SUFFIXES = (".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle")
_ST_DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
                   "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header


class CheckpointError(InputError):
    """A checkpoint file is missing, unreadable, corrupt, of the wrong kind, or outside the models folder."""


class PickleCheckpointError(CheckpointError):
    """A pickle/zip PyTorch checkpoint was given where only safetensors is accepted."""


# ---------------------------------------------------------------- reading / writing

def _sniff(path: Path, size: int) -> None:
    """Raise unless the file starts like a safetensors file whose header fits inside it; never unpickles."""
    with open(path, "rb") as f:
        head = f.read(9)
    n = struct.unpack("<Q", head[:8])[0] if len(head) >= 8 else None
    if len(head) == 9 and head[8:9] == b"{" and n is not None and 8 + n <= size:
        return
    is_zip = head.startswith(b"PK\x03\x04")
    is_pickle = len(head) >= 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode + protocol 2..5
    if is_zip or is_pickle or path.suffix.lower() in PICKLE_SUFFIXES:
        raise PickleCheckpointError(
            f"{path.name} is a pickle/zip PyTorch checkpoint, which can run arbitrary code when loaded, so OmniSync "
            f"refuses it: convert it to safetensors first (on a machine you trust: torch.load it with "
            f"weights_only=True and write it with safetensors.torch.save_file).")
    if len(head) == 9 and head[8:9] == b"{" and n is not None:
        raise CheckpointError(f"{path.name} is truncated or corrupt: its safetensors header claims {n} bytes but the "
                              f"file has only {size}.")
    raise CheckpointError(f"{path.name} is not a safetensors file (it does not start with a safetensors header).")


def _parse_header(path: Path, size: int) -> dict:
    """The whole JSON header of a safetensors file, checked against the file's size."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        if n > _MAX_HEADER:
            raise CheckpointError(f"{path.name} is corrupt: its safetensors header length {n} is implausible.")
        raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise CheckpointError(f"{path.name} is corrupt: its safetensors header is not valid JSON.") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path.name} is corrupt: its safetensors header is not a JSON object.")
    data_len = size - 8 - n
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            begin, end = (int(x) for x in info["data_offsets"])
            numel = 1
            for s in info["shape"]:
                numel *= int(s)
            nbytes = numel * _ST_DTYPE_SIZES.get(info["dtype"], 0)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path.name} is corrupt: the header entry of tensor {name!r} is malformed."
                                  ) from None
        if not 0 <= begin <= end <= data_len:
            raise CheckpointError(f"{path.name} is truncated or corrupt: tensor {name!r} lies at bytes {begin}..{end} "
                                  f"but the data section has only {data_len} bytes.")
        if info["dtype"] in _ST_DTYPE_SIZES and end - begin != nbytes:
            raise CheckpointError(f"{path.name} is corrupt: tensor {name!r} {info['dtype']} {info['shape']} needs "
                                  f"{nbytes} bytes but the header gives it {end - begin}.")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path.name} is corrupt: its safetensors __metadata__ is not a JSON object.")
    return header


def _checked_path(path) -> Path:
    """``path`` as a safetensors file whose header is sound (pickles refused by content, never unpickled)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"Checkpoint not found: {path}.")
    if path.is_dir():
        raise CheckpointError(f"{path} is a folder; give the path of a .safetensors file.")
    _sniff(path, path.stat().st_size)
    return path


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a safetensors header: its safetensors dtype name (``F16``, ``F8_E4M3`` ...) and shape."""

    dtype: str
    shape: tuple


def read_header(path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """The tensors (name -> :class:`TensorInfo`) and metadata of a safetensors file, reading only its header: a
    checkpoint of any size is recognised in milliseconds. Raises like :func:`read_safetensors`."""
    path = _checked_path(path)
    header = _parse_header(path, path.stat().st_size)
    tensors = {k: TensorInfo(v["dtype"], tuple(int(s) for s in v["shape"])) for k, v in header.items()
               if k != "__metadata__"}
    return tensors, _metadata(header)


def _metadata(header: dict) -> dict[str, str]:
    return {str(k): str(v) for k, v in (header.get("__metadata__") or {}).items()}


def _owned(t: torch.Tensor, device: torch.device, dtype: "torch.dtype | None") -> torch.Tensor:
    """A copy of ``t`` in a fresh allocation of its own on ``device`` (cast floating tensors to ``dtype``)."""
    cast = dtype if dtype is not None and t.is_floating_point() else t.dtype
    return torch.empty(t.shape, dtype=cast, device=device).copy_(t)


def iter_safetensors(path, device="cpu", dtype: "torch.dtype | None" = None, keys=None
                     ) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield ``(name, tensor)`` from a safetensors file one tensor at a time, each in its own allocation.

    What it costs: every tensor is copied once, from the file's memory mapping into a fresh (aligned,
    contiguous) allocation on ``device``, cast to ``dtype`` on the way if given. Peak memory is the tensors kept by
    the caller plus one tensor in flight; the mapped pages are file-backed and the kernel drops them as needed, so
    a checkpoint larger than RAM streams onto a GPU. No tensor is a view into the file: safetensors' own tensors sit
    at whatever offset the header puts them (seen: 8 bytes past a 64-byte boundary), and CPU kernels pick other
    (bit-different) code paths for unaligned data. ``keys`` limits the read to those names (others are skipped).
    """
    path = _checked_path(path)
    _parse_header(path, path.stat().st_size)
    device = torch.device(device)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            wanted = None if keys is None else set(keys)
            names = [k for k in f.keys() if wanted is None or k in wanted]
            for name in names:
                yield name, _owned(f.get_tensor(name), device, dtype)
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{path.name} could not be read as safetensors ({e}).") from None


def read_safetensors(path, device="cpu", dtype: "torch.dtype | None" = None
                     ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read a ``.safetensors`` file: (state dict on ``device``, metadata dict). Every tensor has its own aligned
    storage (see :func:`iter_safetensors` for what that costs); ``dtype`` casts floating tensors as they load.

    Raises :class:`PickleCheckpointError` for pickle/zip checkpoints (detected by content, never unpickled) and
    :class:`CheckpointError` for a missing path, a folder, or a truncated/corrupt file.
    """
    path = _checked_path(path)
    meta = _metadata(_parse_header(path, path.stat().st_size))
    return dict(iter_safetensors(path, device=device, dtype=dtype)), meta


def _config_dict(config) -> dict:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    if is_dataclass(config):
        return asdict(config)
    if isinstance(config, Mapping):
        return dict(config)
    raise InputError(f"config must be a config dataclass or a dict, got {type(config).__name__}.")


def _cpu_tensors(state_dict: Mapping) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors, each with its own storage (safetensors refuses shared or tied storage)."""
    out, seen = {}, set()
    for k, v in state_dict.items():
        if not isinstance(v, torch.Tensor):
            raise CheckpointError(f"Cannot save {k!r}: it is a {type(v).__name__}, not a tensor.")
        if v.is_meta:
            raise CheckpointError(f"Cannot save {k!r}: it is on the meta device (the model was never loaded).")
        t = v.detach().to("cpu")
        ptr = t.untyped_storage().data_ptr()
        whole = t.is_contiguous() and t.storage_offset() == 0 and t.untyped_storage().nbytes() == t.nbytes
        if ptr in seen or not whole:
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_model(model: "nn.Module | Mapping[str, torch.Tensor]", path, kind: str, config=None,
               extra_metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``model`` (or a state dict) to ``path`` as safetensors with OmniSync metadata, atomically.

    The file is written to ``path + ".partial"`` and renamed into place, so a failed write never leaves a
    half-written checkpoint (an existing file at ``path`` is kept). ``config`` defaults to ``model.config``.
    """
    if kind not in KINDS:
        raise InputError(f"Unknown checkpoint kind {kind!r}; choose one of {', '.join(KINDS)}.")
    if config is None:
        config = getattr(model, "config", None)
        if config is None:
            raise InputError("save_model needs a config (the model has no .config).")
    sd = model.state_dict() if isinstance(model, nn.Module) else model
    meta = {str(k): str(v) for k, v in (extra_metadata or {}).items()}
    meta.update(format="omnisync", kind=kind, config=json.dumps(_config_dict(config)), omnisync_version=__version__)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    try:
        st.save_file(_cpu_tensors(sd), str(partial), metadata=meta)
        publish(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- validation

@dataclass
class ValidationReport:
    """Differences between a state dict and a model: names, and for shape mismatches `key: got vs expected`."""

    missing: list[str] = field(default_factory=list)
    unexpected: list[str] = field(default_factory=list)
    mismatched: list[str] = field(default_factory=list)
    looks_like: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.missing or self.unexpected or self.mismatched)

    def summary(self, show: int = 6) -> str:
        parts = []
        for label, keys in (("missing", self.missing), ("unexpected", self.unexpected),
                            ("wrong shape", self.mismatched)):
            if keys:
                more = f" (+{len(keys) - show} more)" if len(keys) > show else ""
                parts.append(f"{len(keys)} {label}: {', '.join(keys[:show])}{more}")
        text = "; ".join(parts) if parts else "all tensors match"
        return text + (f". The weights look like {self.looks_like}" if self.looks_like else "")

    def __str__(self) -> str:
        return self.summary()


class CheckpointMismatchError(WeightsError):
    """The checkpoint's tensors do not fit the model; ``.report`` holds the :class:`ValidationReport`."""

    def __init__(self, what: str, report: ValidationReport):
        super().__init__(f"The weights do not fit the {what}: {report.summary()}.")
        self.report = report


def _shape_of(t) -> tuple:
    return tuple(t.shape) if hasattr(t, "shape") else ()


def validate_state_dict(state_dict: Mapping, expected: Mapping[str, tuple], optional: tuple[str, ...] = ()
                        ) -> ValidationReport:
    """Compare key names and shapes; keys in ``optional`` may be present or absent."""
    have = set(state_dict)
    mism = [f"{k}: got {_shape_of(state_dict[k])} vs expected {tuple(expected[k])}"
            for k in sorted(have & set(expected)) if _shape_of(state_dict[k]) != tuple(expected[k])]
    return ValidationReport(missing=sorted(set(expected) - have - set(optional)),
                            unexpected=sorted(have - set(expected) - set(optional)), mismatched=mism)


def _match_score(state_dict: Mapping, expected: Mapping[str, tuple]) -> float:
    hits = sum(1 for k, s in expected.items() if k in state_dict and _shape_of(state_dict[k]) == tuple(s))
    return hits / max(len(expected), len(state_dict), 1)


def _best_match(state_dict: Mapping, candidates: Mapping[str, Mapping[str, tuple]]) -> str | None:
    scored = sorted(((_match_score(state_dict, exp), name) for name, exp in candidates.items()), reverse=True)
    if not scored or scored[0][0] == 0:
        return None
    score, name = scored[0]
    return f"{name} ({score:.0%} of tensors match)"


def _meta_shapes(build: Callable[[], nn.Module]) -> dict[str, tuple]:
    with torch.device("meta"):
        return {k: tuple(v.shape) for k, v in build().state_dict().items()}


@lru_cache(maxsize=32)
def _dit_shapes_cached(cfg_json: str) -> dict[str, tuple]:
    # build one block and replicate its keys: shapes only, so the 14B preset costs no more than the tiny one
    cfg = DiTConfig.from_dict(json.loads(cfg_json))
    one = _meta_shapes(lambda: OmniSyncDiT(get_config(cfg, num_layers=1)))
    out = {}
    for k, s in one.items():
        if k.startswith("blocks.0."):
            out.update({f"blocks.{i}.{k[9:]}": s for i in range(cfg.num_layers)})
        else:
            out[k] = s
    return out


def _dit_shapes(cfg: DiTConfig) -> dict[str, tuple]:
    return _dit_shapes_cached(json.dumps(cfg.to_dict(), sort_keys=True))


def _dit_candidates() -> dict[str, dict[str, tuple]]:
    out = {}
    for name, cfg in DIT_PRESETS.items():
        out[f"preset {name!r}"] = _dit_shapes(cfg)
        out[f"preset {name!r} as a Wan2.1 base (no audio, 16 input channels)"] = _dit_shapes(
            get_config(cfg, enable_audio=False, source_concat=False))
    return out


# ---------------------------------------------------------------- devices and dtypes

_DTYPES = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16, "float16": torch.float16,
           "half": torch.float16, "fp32": torch.float32, "float32": torch.float32, "float": torch.float32}


def _mps_available() -> bool:
    return bool(getattr(torch.backends, "mps", None) and torch.backends.mps.is_available())


def resolve_device(name: "str | torch.device | None" = "auto") -> torch.device:
    """``"auto"`` (or None) -> cuda if available, else mps, else cpu; other names are checked for availability."""
    if isinstance(name, torch.device):
        name = str(name)
    name = (name or "auto").strip().lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise InputError(f"Unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps.") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"Device {name!r} was requested but CUDA is not available here; use auto or cpu.")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise InputError(f"Device {name!r} does not exist: {torch.cuda.device_count()} CUDA device(s) found.")
    if dev.type == "mps" and not _mps_available():
        raise InputError(f"Device {name!r} was requested but MPS is not available here; use auto or cpu.")
    if dev.type not in ("cpu", "cuda", "mps", "meta"):
        raise InputError(f"Unsupported device {name!r}; use auto, cpu, cuda, cuda:N or mps.")
    return dev


def resolve_dtype(name: "str | torch.dtype | None" = "auto", device: "str | torch.device | None" = None
                  ) -> torch.dtype:
    """``"auto"`` -> bf16 on CUDA with bf16 support, fp16 on other CUDA and on MPS, fp32 on CPU; or an explicit
    ``"bf16"`` / ``"fp16"`` / ``"fp32"`` (or torch dtype)."""
    if isinstance(name, torch.dtype):
        if name not in _DTYPES.values():
            raise InputError(f"Unsupported weight dtype {name}; use bf16, fp16 or fp32.")
        return name
    name = (name or "auto").strip().lower()
    if name == "auto":
        dev = resolve_device(device)
        if dev.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float16 if dev.type == "mps" else torch.float32
    if name not in _DTYPES:
        raise InputError(f"Unknown dtype {name!r}; use auto, bf16, fp16 or fp32.")
    return _DTYPES[name]


def _target(device, dtype) -> tuple[torch.device | None, torch.dtype | None]:
    dev = None if device is None else resolve_device(device)
    dt = None if dtype is None else resolve_dtype(dtype, dev)
    return dev, dt


def _cast(sd: Mapping[str, torch.Tensor], device, dtype) -> dict[str, torch.Tensor]:
    """Move to device; cast floating tensors to dtype (no copy when nothing changes)."""
    return {k: v.to(device=device if device is not None else v.device,
                    dtype=dtype if dtype is not None and v.is_floating_point() else v.dtype)
            for k, v in sd.items()}


# ---------------------------------------------------------------- models

def _source(path_or_sd, kind: str, device, select: Callable | None = None) -> tuple[dict, dict, str]:
    """(state dict, metadata, name for messages); refuses an OmniSync checkpoint of another kind. ``select``
    (names -> the names to read) keeps the rest of a file unread."""
    if isinstance(path_or_sd, Mapping):
        return dict(path_or_sd), {}, "state dict"
    read_dev = device if device is not None and device.type != "meta" else "cpu"
    if select is None:
        sd, meta = read_safetensors(path_or_sd, device=read_dev)
    else:
        names, meta = read_header(path_or_sd)
        sd = dict(iter_safetensors(path_or_sd, device=read_dev, keys=select(names)))
    name = Path(path_or_sd).name
    if meta.get("format") == "omnisync" and meta.get("kind") not in (None, kind):
        raise CheckpointError(f"{name} is an OmniSync {meta.get('kind')} checkpoint, not a {kind} one.")
    return sd, meta, name


def _meta_config(meta: dict, name: str) -> dict | None:
    if meta.get("format") != "omnisync" or "config" not in meta:
        return None
    try:
        cfg = json.loads(meta["config"])
    except json.JSONDecodeError:
        raise CheckpointError(f"{name} has an unreadable config in its metadata.") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{name} has an unreadable config in its metadata.")
    return cfg


def _assign(model: nn.Module, sd: dict) -> nn.Module:
    """load_state_dict(assign=True) into a meta-built model, then check nothing is left on the meta device."""
    model.load_state_dict(sd, strict=True, assign=True)
    on_meta = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    if on_meta and any(not t.is_meta for t in sd.values()):
        raise CheckpointError(f"These tensors were not loaded: {', '.join(on_meta[:6])}.")
    return model.eval()


def _normalize_dit(sd: Mapping) -> dict:
    try:
        return normalize_wan_state_dict(dict(sd))
    except KeyError as e:
        raise WeightsError(f"The weights are not a Wan2.1/OmniSync DiT state dict: {e.args[0]}.") from None


def infer_dit_config(state_dict: Mapping, preset: "str | DiTConfig | None" = None) -> DiTConfig:
    """Read the DiT architecture from tensor shapes (Wan key names).

    Heads are not visible in the shapes: they come from a preset of the same width, else Wan's head_dim of 128.
    Fields that shapes do not show (text_len, audio_window, eps, ...) come from ``preset`` or that preset.
    """
    sd = state_dict

    def need(key):
        if key not in sd:
            raise WeightsError(f"Cannot infer the DiT architecture: key {key} is missing.")
        return tuple(sd[key].shape)

    dim, patch_in, *patch = need("patch_embedding.weight")
    out_dim = need("head.head.weight")[0] // max(1, patch[0] * patch[1] * patch[2])
    layers = {int(m.group(1)) for k in sd if (m := re.match(r"blocks\.(\d+)\.", k))}
    same_dim = [c for c in DIT_PRESETS.values() if c.dim == dim]
    base = get_config(preset) if preset is not None else (same_dim[0] if same_dim else DiTConfig())
    if preset is None and not same_dim and dim % 128:
        raise WeightsError(f"Cannot infer the number of heads for width {dim}; pass a preset or a DiTConfig.")
    heads = base.num_heads if base.dim == dim else dim // 128
    audio = "audio_embedding.0.weight" in sd
    concat = patch_in == 2 * out_dim
    return get_config(
        base, dim=dim, num_heads=heads, num_layers=len(layers), ffn_dim=need("blocks.0.ffn.0.weight")[0],
        in_dim=patch_in // 2 if concat else patch_in, out_dim=out_dim, patch_size=tuple(patch),
        freq_dim=need("time_embedding.0.weight")[1], text_dim=need("text_embedding.0.weight")[1],
        audio_dim=need("audio_embedding.0.weight")[1] if audio else base.audio_dim, enable_audio=audio,
        source_concat=concat, qk_norm="blocks.0.self_attn.norm_q.weight" in sd,
        cross_attn_norm="blocks.0.norm3.weight" in sd)


def _dit_report_error(sd: dict, cfg: DiTConfig, what: str) -> None:
    report = validate_state_dict(sd, _dit_shapes(cfg), optional=("text_context",))
    if not report.ok:
        report.looks_like = _best_match(sd, _dit_candidates())
        if cfg.enable_audio and "Wan2.1 base" in (report.looks_like or ""):
            report.looks_like += "; import a Wan2.1 base with omnisync_from_wan"
        raise CheckpointMismatchError(what, report)


def load_dit(path_or_state_dict, preset: "str | DiTConfig | None" = None, device=None, dtype=None) -> OmniSyncDiT:
    """Load an OmniSyncDiT from a safetensors file or a state dict (eval mode).

    Config: the checkpoint's metadata (it wins over ``preset``), else ``preset`` (a name or a DiTConfig), else
    inferred from the shapes (a Wan2.1 base then loads as a plain Wan model). The model is built on the
    meta device and the tensors are assigned (no random init, no copy unless device/dtype change them).
    Raises :class:`CheckpointMismatchError` with a :class:`ValidationReport` when the weights do not fit.
    """
    device, dtype = _target(device, dtype)
    sd, meta, name = _source(path_or_state_dict, "dit", device)
    sd = _normalize_dit(sd)
    cfg_dict = _meta_config(meta, name)
    if cfg_dict is not None:
        cfg = DiTConfig.from_dict(cfg_dict)
    elif preset is not None:
        cfg = get_config(preset)
    else:
        try:
            cfg = infer_dit_config(sd)
        except WeightsError as e:
            looks = _best_match(sd, _dit_candidates())
            raise WeightsError(f"{e} The weights look like {looks}." if looks else str(e)) from None
    _dit_report_error(sd, cfg, f"OmniSync DiT ({name})")
    with torch.device("meta"):
        model = OmniSyncDiT(cfg)
    return _assign(model, _cast(sd, device, dtype))


def omnisync_from_wan(path_or_sd, preset: "str | DiTConfig | None" = None, device=None, dtype=None,
                      **overrides) -> OmniSyncDiT:
    """Turn a Wan2.1 T2V base checkpoint (original or diffusers names) into an OmniSyncDiT that equals it.

    The backbone is loaded as it is; the audio branch is new (its output projection zero) and the 16 source input
    channels of the patch embedding are zero. ``preset`` fixes the config, else it is inferred from the base
    shapes, with audio and source conditioning switched on; ``overrides`` set DiTConfig fields (e.g. audio_dim).
    """
    device, dtype = _target(device, dtype)
    sd, meta, name = _source(path_or_sd, "dit", device)
    if meta.get("format") == "omnisync":
        raise CheckpointError(f"{name} is already an OmniSync checkpoint; load it with load_dit.")
    sd = _normalize_dit(sd)
    if "audio_embedding.0.weight" in sd:
        raise CheckpointError(f"{name} already has audio layers, so it is not a Wan2.1 base; load it with load_dit.")
    if preset is not None:
        cfg = get_config(preset, **overrides)
    else:
        inferred = infer_dit_config(sd)
        if inferred.source_concat:
            raise CheckpointError(f"{name} has {2 * inferred.in_dim} input channels; a Wan2.1 T2V base has "
                                  f"{inferred.in_dim}.")
        cfg = get_config(inferred, **{"enable_audio": True, "source_concat": True, **overrides})
    _dit_report_error(sd, get_config(cfg, enable_audio=False, source_concat=False), f"Wan2.1 base ({name})")
    return OmniSyncDiT.from_wan_state_dict(sd, cfg, device=device, dtype=dtype).eval()


def _vae_config(d: dict) -> WanVAEConfig:
    try:
        return WanVAEConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()})
    except TypeError as e:
        raise CheckpointError(f"The VAE config in the checkpoint metadata is invalid ({e}).") from None


def load_vae(path_or_sd, device=None, dtype=None, config: "dict | None" = None) -> WanVAE:
    """Load the Wan2.1 VAE (original or diffusers names) from safetensors or a state dict; config from
    ``config``, the metadata, or inferred from the shapes; meta-device build, eval mode."""
    device, dtype = _target(device, dtype)
    sd, meta, name = _source(path_or_sd, "vae", device)
    if is_diffusers_vae(sd):
        sd = diffusers_to_wan_vae(sd)
    cfg_dict = config if config is not None else _meta_config(meta, name)
    cfg = _vae_config(cfg_dict) if cfg_dict is not None else WanVAEConfig.from_state_dict(sd)
    with torch.device("meta"):
        model = WanVAE(cfg)
    report = validate_state_dict(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if not report.ok:
        report.looks_like = _best_match(sd, {f"VAE preset {p!r}": _meta_shapes(lambda p=p: WanVAE(p))
                                             for p in ("wan2.1", "tiny")})
        raise CheckpointMismatchError(f"Wan2.1 VAE ({name})", report)
    return _assign(model, _cast(sd, device, dtype))


def load_whisper(path_or_sd, device=None, dtype=None, config: "dict | None" = None) -> WhisperEncoder:
    """Load a Whisper encoder (openai or Hugging Face names) from safetensors or a state dict; config from
    ``config``, the metadata, or inferred from the shapes (64-wide heads); meta-device build, eval mode. Of a
    whole-model file (Comfy-Org's ``whisper_large_v3_fp16``: ``model.encoder.*`` + ``model.decoder.*``) only the
    encoder's tensors are read."""
    device, dtype = _target(device, dtype)
    sd, meta, name = _source(path_or_sd, "whisper", device, select=whisper_encoder_keys)
    sd = to_openai_whisper_encoder(sd)
    cfg_dict = config if config is not None else _meta_config(meta, name)
    try:
        cfg = WhisperEncoderConfig(**cfg_dict) if cfg_dict is not None else infer_whisper_config(sd)
    except TypeError as e:
        raise CheckpointError(f"The Whisper config in {name}'s metadata is invalid ({e}).") from None
    if "positional_embedding" not in sd:  # fixed sinusoids; HF checkpoints may leave them out
        sd["positional_embedding"] = sinusoids(cfg.n_ctx, cfg.d_model)
    with torch.device("meta"):
        model = WhisperEncoder(cfg)
    report = validate_state_dict(sd, {k: tuple(v.shape) for k, v in model.state_dict().items()})
    if not report.ok:
        report.looks_like = _best_match(sd, {f"Whisper {p!r}": _meta_shapes(lambda p=p: WhisperEncoder(p))
                                             for p in WHISPER_PRESETS if not p.endswith(".en")})
        raise CheckpointMismatchError(f"Whisper encoder ({name})", report)
    return _assign(model, _cast(sd, device, dtype))


# ---------------------------------------------------------------- models folder guard

def resolve_model_path(name, roots: "list[Path]") -> Path:
    """Resolve a user-given model name inside one of the models folders ``roots`` (first existing match).

    Symlinks are resolved before the check; a name that ends up outside every root (``..``, an absolute path
    elsewhere, a symlink pointing out) is refused with "path outside the models folder".
    """
    if name is None or not str(name).strip():
        raise CheckpointError("No model file name was given.")
    roots = [Path(r).expanduser().resolve() for r in roots]
    if not roots:
        raise CheckpointError("No models folder is configured.")
    raw = Path(str(name).strip()).expanduser()
    inside = []
    for root in roots:
        cand = (raw if raw.is_absolute() else root / raw).resolve()
        if any(cand.is_relative_to(r) for r in roots):
            inside.append(cand)
    if not inside:
        raise CheckpointError(f"{str(name)!r}: path outside the models folder ({', '.join(map(str, roots))}).")
    for cand in inside:
        if cand.is_file():
            return cand
    raise CheckpointError(f"Model {str(name)!r} was not found in {', '.join(map(str, roots))}.")
