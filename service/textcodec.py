"""Text of byte-level token streams, as the service needs it: incremental and UTF-8 safe.

The byte tokenizer's contract (ids 0-255 are UTF-8 bytes, specials above) comes from the model's
metadata; this module only turns ids into text without splitting a character across chunks.
"""

from __future__ import annotations

import codecs

BYTE_VOCAB = 256


def encode_text(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def token_text(token: int) -> str:
    """The text of one token alone: empty for specials and for bytes that start or continue a character."""
    if 0 <= token < 128:
        return chr(token)
    return ""


class StreamDecoder:
    """Decodes a stream of token ids, holding back bytes of an unfinished UTF-8 character."""

    def __init__(self) -> None:
        self._decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def feed(self, tokens: list[int]) -> str:
        return self._decoder.decode(bytes(t for t in tokens if 0 <= t < BYTE_VOCAB))

    def flush(self) -> str:
        return self._decoder.decode(b"", final=True)
