"""Whether a bot's small-talk reply reads as language: one of the corpus's reply shapes, slot for slot.

A reply follows a shape when each `{kind}` slot holds a word of that kind's pool (either half: the
model may answer held-out small talk with words it trained on) and each `{echo}` slot holds, byte for
byte, a noun the user's line contains: picking up the user's word is copying, and a near miss
("the gardon") does not count. "i have never bony sunny." follows no shape.
"""

from __future__ import annotations

import re
from functools import cache

from cellstream.model.languages import LANGUAGES

_SLOT = re.compile(r"\{(\w+)\}")


def _alternation(words: list[str]) -> str:
    return "(?:" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


@cache
def _patterns(language: str) -> tuple[re.Pattern[str], ...]:
    """One pattern per bot shape; an {echo} slot captures its text in a group named `echo`."""
    talk = LANGUAGES[language].small_talk
    out = []
    for shape in talk.bot_shapes:
        parts, end = [], 0
        for slot in _SLOT.finditer(shape):
            parts.append(re.escape(shape[end : slot.start()]))
            kind = slot.group(1)
            parts.append(f"(?P<echo>{_alternation(list(talk.words['noun']))})" if kind == "echo"
                         else _alternation(list(talk.words[kind])))
            end = slot.end()
        parts.append(re.escape(shape[end:]))
        out.append(re.compile("".join(parts)))
    return tuple(out)


def follows_a_shape(reply: str, user_line: str, language: str) -> bool:
    """Whether `reply` is one of the language's bot shapes, its echoed noun (if any) taken from `user_line`."""
    for pattern in _patterns(language):
        match = pattern.fullmatch(reply)
        if match and ("echo" not in pattern.groupindex or _contains_word(user_line, match.group("echo"))):
            return True
    return False


def _contains_word(text: str, word: str) -> bool:
    """`word` in `text` as a whole word, or as the stem of a plural ("do you like {noun}s?")."""
    return re.search(rf"(?<!\w){re.escape(word)}s?(?!\w)", text) is not None
