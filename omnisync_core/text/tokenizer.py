"""umT5 tokenizer: the sentencepiece model embedded in ComfyUI's umt5 files, used the way Wan2.1 / HuMo use it.

Wan's ``HuggingfaceTokenizer(name="google/umt5-xxl", seq_len=512, clean="whitespace")`` cleans the text (ftfy's
``fix_text``, HTML unescaped twice, whitespace runs collapsed to one space, stripped), appends the end-of-sequence
token, truncates to 512 tokens (the EOS kept last) and pads with the pad token. Here the same model is run through
``sentencepiece`` itself (as ComfyUI does) instead of the Hugging Face fast tokenizer, and :func:`clean_text` redoes
the parts of ``fix_text`` that change well-formed text, without the ftfy package (see its docstring).
"""

from __future__ import annotations

import html
import re
import unicodedata
from pathlib import Path
from typing import Sequence

import torch

from ..errors import InputError

__all__ = ["SPIECE_KEY", "UMT5Tokenizer", "clean_text"]

SPIECE_KEY = "spiece_model"  # ComfyUI's name for the serialized sentencepiece model (a uint8 tensor)

# ftfy's default fixes that alter well-formed text: curly quotes -> ASCII, fullwidth/halfwidth forms -> standard
# width (U+3000 -> space), Latin ligatures and digraphs -> letters, unintended control characters removed.
_QUOTES = {**{c: "'" for c in (0x02BC, *range(0x2018, 0x201C))}, **{c: '"' for c in range(0x201C, 0x2020)}}
_WIDTH = {0x3000: " ", **{c: unicodedata.normalize("NFKC", chr(c)) for c in range(0xFF01, 0xFFF0)
                          if unicodedata.normalize("NFKC", chr(c)) != chr(c)}}
_LIGATURES = {ord(a): b for a, b in (("Ĳ", "IJ"), ("ĳ", "ij"), ("ŉ", "ʼn"), ("Ǳ", "DZ"), ("ǲ", "Dz"), ("ǳ", "dz"),
                                     ("Ǆ", "DŽ"), ("ǅ", "Dž"), ("ǆ", "dž"), ("Ǉ", "LJ"), ("ǈ", "Lj"), ("ǉ", "lj"),
                                     ("Ǌ", "NJ"), ("ǋ", "Nj"), ("ǌ", "nj"), ("ﬀ", "ff"), ("ﬁ", "fi"), ("ﬂ", "fl"),
                                     ("ﬃ", "ffi"), ("ﬄ", "ffl"), ("ﬅ", "ſt"), ("ﬆ", "st"))}
_CONTROL = dict.fromkeys([*range(0x00, 0x09), 0x0B, *range(0x0E, 0x20), 0x7F, *range(0x206A, 0x2070), 0xFEFF,
                          *range(0xFFF9, 0xFFFD)])
_TABLE = {**_CONTROL, **_LIGATURES, **_WIDTH}
_SPACES = re.compile(r"\s+")


def clean_text(text: str) -> str:
    """Wan's ``clean="whitespace"``: ``whitespace_clean(basic_clean(text))``.

    ``basic_clean`` is ``ftfy.fix_text`` + ``html.unescape`` twice + strip. Of ``fix_text``'s default steps this
    keeps those that change well-formed text: ligatures and digraphs spelled out, fullwidth/halfwidth forms to
    standard width, control characters removed, NFC, curly quotes uncurled (the HTML unescape and line-break
    steps are covered by Wan's own unescape and the whitespace collapse). It does not repair mojibake
    (UTF-8 decoded as Windows-1252 and the like) or terminal escape sequences: text with those differs from Wan's.
    """
    text = html.unescape(html.unescape(text))
    text = unicodedata.normalize("NFC", text.translate(_TABLE)).translate(_QUOTES)
    return _SPACES.sub(" ", text.strip()).strip()


def _sentencepiece():
    try:
        import sentencepiece
    except ImportError:
        raise InputError("Encoding text needs the sentencepiece package (listed in requirements.txt), which is not "
                         "installed.") from None
    return sentencepiece


class UMT5Tokenizer:
    """Text -> umT5 token ids: :func:`clean_text`, sentencepiece, EOS appended, truncated / padded to
    ``max_length`` (512, Wan's ``text_len``). ``eos_id`` / ``pad_id`` come from the model (1 / 0 in umT5)."""

    def __init__(self, model_proto: bytes, max_length: int = 512):
        try:
            self.sp = _sentencepiece().SentencePieceProcessor(model_proto=bytes(model_proto))
        except (RuntimeError, OSError, TypeError) as e:
            raise InputError(f"The embedded tokenizer is not a valid sentencepiece model ({e}).") from None
        if max_length < 1:
            raise InputError(f"max_length must be at least 1, got {max_length}.")
        self.max_length = max_length
        self.eos_id = self.sp.eos_id() if self.sp.eos_id() >= 0 else 1
        self.pad_id = self.sp.pad_id() if self.sp.pad_id() >= 0 else 0

    @classmethod
    def from_file(cls, path, max_length: int = 512) -> "UMT5Tokenizer":
        """From a ``spiece.model`` file."""
        return cls(Path(path).expanduser().read_bytes(), max_length)

    @classmethod
    def from_tensor(cls, t: torch.Tensor, max_length: int = 512) -> "UMT5Tokenizer":
        """From ComfyUI's ``spiece_model`` uint8 tensor."""
        if t is None or t.dtype != torch.uint8 or t.dim() != 1:
            raise InputError(f"The {SPIECE_KEY!r} tensor must be 1-D uint8 (a serialized sentencepiece model).")
        return cls(t.cpu().numpy().tobytes(), max_length)

    def to_tensor(self) -> torch.Tensor:
        """The model as ComfyUI stores it: ``spiece_model``, a 1-D uint8 tensor of the serialized proto."""
        return torch.frombuffer(bytearray(self.sp.serialized_model_proto()), dtype=torch.uint8)

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def encode(self, text: str, max_length: int | None = None) -> list[int]:
        """Ids of the cleaned text with EOS appended, at most ``max_length`` of them (EOS kept last)."""
        limit = self.max_length if max_length is None else max_length
        if not isinstance(text, str):
            raise InputError(f"A prompt must be text, got {type(text).__name__}.")
        ids = self.sp.encode(clean_text(text), out_type=int)
        return ids[: limit - 1] + [self.eos_id]

    def __call__(self, texts: "str | Sequence[str]", max_length: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(ids, mask)``: int64 ``[n, max_length]`` padded with ``pad_id``, and the 0/1 mask of real tokens."""
        limit = self.max_length if max_length is None else max_length
        rows = [self.encode(t, limit) for t in ([texts] if isinstance(texts, str) else texts)]
        ids = torch.full((len(rows), limit), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), limit), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
            mask[i, : len(row)] = 1
        return ids, mask
