"""Byte-level tokenizer: ids 0-255 are UTF-8 bytes, a few special tokens follow.

Torch-free on purpose: the export writes this contract into the ONNX metadata, and the service
serves from that metadata without importing this package.
"""

from __future__ import annotations

from collections.abc import Iterable

BYTE_VOCAB = 256
PAD = 256
BOS = 257
EOS = 258  # end of a dialogue or document
EOT = 259  # end of a turn
VOCAB_SIZE = 260
SPECIAL_TOKENS: dict[str, int] = {"pad": PAD, "bos": BOS, "eos": EOS, "eot": EOT}
KIND = "bytes-v1"


def encode(text: str, *, bos: bool = False, eos: bool = False) -> list[int]:
    """UTF-8 bytes of `text` as ids, optionally framed by BOS/EOS."""
    ids = list(text.encode("utf-8"))
    if bos:
        ids.insert(0, BOS)
    if eos:
        ids.append(EOS)
    return ids


def decode(ids: Iterable[int]) -> str:
    """Text of the byte ids; special tokens are dropped, broken UTF-8 becomes U+FFFD."""
    data = bytes(i for i in ids if 0 <= i < BYTE_VOCAB)
    return data.decode("utf-8", errors="replace")


def is_special(token: int) -> bool:
    return BYTE_VOCAB <= token < VOCAB_SIZE
