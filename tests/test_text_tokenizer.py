"""umT5 tokenizer: sentencepiece model embedded as ComfyUI does, Wan's cleaning, EOS, truncation and padding."""

from __future__ import annotations

import html
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from omnisync_core.errors import InputError
from omnisync_core.text import SPIECE_KEY, UMT5Tokenizer, clean_text

spm = pytest.importorskip("sentencepiece")

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "A person is talking to the camera, with clear and natural mouth movements.",
    "Peter Piper picked a peck of pickled peppers, and then he sat down by the river.",
    "She sells sea shells by the sea shore; the shells she sells are surely sea shells.",
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量",
    "How much wood would a woodchuck chuck if a woodchuck could chuck wood?",
    "Numbers 0 1 2 3 4 5 6 7 8 9 and punctuation: commas, periods. (brackets) \"quotes\" 'apostrophes'",
]


def train_spiece(folder: Path, vocab_size: int = 200) -> bytes:
    """A small unigram sentencepiece model with umT5's special ids (pad 0, eos 1, unk 2, no bos), trained on a text
    file written here; returns the serialized model (the bytes ComfyUI embeds as ``spiece_model``)."""
    text = Path(folder) / "corpus.txt"
    text.write_text("\n".join(CORPUS * 30), encoding="utf-8")
    prefix = Path(folder) / "spiece"
    spm.SentencePieceTrainer.train(input=str(text), model_prefix=str(prefix), vocab_size=vocab_size,
                                   model_type="unigram", pad_id=0, eos_id=1, unk_id=2, bos_id=-1,
                                   character_coverage=1.0, hard_vocab_limit=False, minloglevel=2, num_threads=1)
    return prefix.with_suffix(".model").read_bytes()


@pytest.fixture(scope="module")
def spiece(tmp_path_factory) -> bytes:
    return train_spiece(tmp_path_factory.mktemp("spiece"))


def wan_whitespace_clean(text: str) -> str:
    """Wan's clean='whitespace' without ftfy: html.unescape twice, strip, collapse whitespace (tokenizers.py)."""
    return re.sub(r"\s+", " ", html.unescape(html.unescape(text)).strip()).strip()


TEXTS = ["The quick brown fox.", "  A person   is\ttalking\n to the camera.  ", "色调艳丽，过曝，静态",
         "pickled peppers by the river", "", "x"]


def test_ids_are_sentencepiece_ids_with_eos(spiece):
    tok = UMT5Tokenizer(spiece)
    sp = spm.SentencePieceProcessor(model_proto=spiece)
    assert (tok.eos_id, tok.pad_id) == (1, 0) and tok.vocab_size == sp.get_piece_size()
    for text in TEXTS:
        assert tok.encode(text) == sp.encode(wan_whitespace_clean(text)) + [1], text


def test_embedded_like_comfyui(spiece, tmp_path):
    """ComfyUI stores the model as the 1-D uint8 tensor ``spiece_model``; it survives a safetensors round trip."""
    tok = UMT5Tokenizer(spiece)
    t = tok.to_tensor()
    assert t.dtype == torch.uint8 and t.dim() == 1 and bytes(t.numpy()) == spm.SentencePieceProcessor(
        model_proto=spiece).serialized_model_proto()
    save_file({SPIECE_KEY: t}, str(tmp_path / "te.safetensors"))
    back = UMT5Tokenizer.from_tensor(load_file(str(tmp_path / "te.safetensors"))[SPIECE_KEY])
    assert all(back.encode(x) == tok.encode(x) for x in TEXTS)
    (tmp_path / "spiece.model").write_bytes(spiece)
    assert UMT5Tokenizer.from_file(tmp_path / "spiece.model").encode(TEXTS[0]) == tok.encode(TEXTS[0])


def test_truncation_keeps_eos_last_and_padding(spiece):
    tok = UMT5Tokenizer(spiece)
    long = " ".join(CORPUS * 20)
    full = spm.SentencePieceProcessor(model_proto=spiece).encode(wan_whitespace_clean(long))
    assert len(full) > 600
    ids = tok.encode(long)
    assert len(ids) == 512 and ids[-1] == tok.eos_id and ids[:511] == full[:511]
    batch, mask = tok(["The quick brown fox.", long], max_length=512)
    n = len(tok.encode("The quick brown fox."))
    assert batch.shape == mask.shape == (2, 512) and batch.dtype == mask.dtype == torch.long
    assert batch[0, :n].tolist() == tok.encode("The quick brown fox.")
    assert (batch[0, n:] == tok.pad_id).all() and mask[0].tolist() == [1] * n + [0] * (512 - n)
    assert mask[1].all() and batch[1].tolist() == ids
    short, short_mask = tok("The quick brown fox.", max_length=4)
    assert short.shape == (1, 4) and short[0, -1] == tok.eos_id and short_mask.all()


def test_clean_text_follows_wan():
    assert clean_text("  a \t b\n\nc  ") == "a b c"
    assert clean_text("&amp;lt;b&amp;gt; Tom &amp; Jerry") == "<b> Tom & Jerry"  # unescaped twice, as Wan does
    # ftfy.fix_text's fixes of well-formed text: quotes, width, ligatures, control characters, NFC
    assert clean_text("“Hi,” she said, ‘go’") == "\"Hi,\" she said, 'go'"
    assert clean_text("Ａｂｃ，１２３　ok") == "Abc,123 ok"
    assert clean_text("ﬁne ﬂow") == "fine flow"
    assert clean_text("a\x00b\x1fc\u200b") == "abc\u200b"
    assert clean_text("cafe\u0301") == "caf\u00e9"


def test_clean_text_matches_ftfy_on_well_formed_text():
    """Against Wan's own basic_clean + whitespace_clean with ftfy itself (optional oracle)."""
    ftfy = pytest.importorskip("ftfy")
    samples = ["“Quoted” and ‘single’ text", "Ｆｕｌｌｗｉｄｔｈ　ＡＢＣ１２３！", "ﬁsh and ﬂour, ĳssel",
               "control\x07chars\x1b here\x7f", "&amp;quot;html&amp;quot; &lt;tags&gt;", "e\u0301t\u00e9",
               "色调艳丽，过曝，静态，细节模糊不清，字幕", "line\u2028break and\r\nCRLF\u3000space"]
    for text in samples:
        wan = re.sub(r"\s+", " ", html.unescape(html.unescape(ftfy.fix_text(text))).strip()).strip()
        assert clean_text(text) == wan, text


def test_bad_model_and_bad_input(spiece):
    with pytest.raises(InputError, match="sentencepiece"):
        UMT5Tokenizer(b"not a sentencepiece model")
    with pytest.raises(InputError, match="uint8"):
        UMT5Tokenizer.from_tensor(torch.zeros(4, dtype=torch.float32))
    with pytest.raises(InputError, match="text"):
        UMT5Tokenizer(spiece).encode(123)
