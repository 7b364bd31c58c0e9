from hypothesis import given, settings
from hypothesis import strategies as st

from cellstream.model import tokenizer
from cellstream.model.tokenizer import BOS, BYTE_VOCAB, EOS, EOT, PAD, SPECIAL_TOKENS, VOCAB_SIZE, decode, encode

FRENCH = "Élodie a mangé une crème brûlée à Noël"


@settings(max_examples=300, deadline=None, database=None)
@given(st.text())
def test_roundtrip_arbitrary_unicode(text):
    ids = encode(text)
    assert all(0 <= i < BYTE_VOCAB for i in ids)
    assert len(ids) == len(text.encode("utf-8"))
    assert decode(ids) == text
    assert decode(encode(text, bos=True, eos=True)) == text


def test_roundtrip_french_accents():
    ids = encode(FRENCH)
    assert decode(ids) == FRENCH
    # Each accented letter is two UTF-8 bytes: É, é, è, û, é, à, ë -> 7 extra bytes.
    assert len(ids) == len(FRENCH) + 7
    assert ids[:2] == [0xC3, 0x89]  # "É"


def test_special_tokens_are_distinct_and_above_bytes():
    values = list(SPECIAL_TOKENS.values())
    assert len(set(values)) == len(values) == 4
    assert all(BYTE_VOCAB <= v < VOCAB_SIZE for v in values)
    assert {PAD, BOS, EOS, EOT} == set(values)
    assert BYTE_VOCAB + len(values) == VOCAB_SIZE
    assert all(tokenizer.is_special(v) for v in values)
    assert not any(tokenizer.is_special(b) for b in range(BYTE_VOCAB))
    assert not tokenizer.is_special(VOCAB_SIZE)


def test_encode_frames_with_bos_and_eos():
    assert encode("ab") == [97, 98]
    assert encode("ab", bos=True) == [BOS, 97, 98]
    assert encode("ab", eos=True) == [97, 98, EOS]
    assert encode("ab", bos=True, eos=True) == [BOS, 97, 98, EOS]
    assert encode("", bos=True, eos=True) == [BOS, EOS]


def test_decode_drops_special_tokens():
    ids = [BOS, *encode("héllo"), EOT, PAD, *encode(" à"), EOS]
    assert decode(ids) == "héllo à"
    assert decode([BOS, EOS, PAD, EOT]) == ""


def test_decode_replaces_broken_utf8():
    assert decode([0xC3]) == "\ufffd"
    assert decode([*encode("a"), 0xFF, *encode("b")]) == "a\ufffdb"


# model/__init__.py's list: what imports without the train extra.
TORCH_FREE = ("tokenizer", "languages", "corpus", "signal", "parity", "reference", "forecast_quality", "evaluate",
              "onnx_file", "onnx_adapt", "glassbox")


def test_the_torch_free_modules_import_without_torch(run_module):
    modules = ", ".join(["cellstream", "cellstream.model", *(f"cellstream.model.{m}" for m in TORCH_FREE)])
    # torch is installed here: a None in sys.modules makes importing it fail, as where it is not.
    result = run_module("-c", f"import sys; sys.modules['torch'] = None; import {modules}")
    assert result.returncode == 0, result.stderr
