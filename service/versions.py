"""How a model version is named where sessions keep it: the `model` of a session record, in memory, in Redis and
in snapshots, is its version's key. Version 1's key is the bare model name, which is what every session
written before versions existed holds; other versions' keys are `NAME@VERSION`. A server that does not serve
a key's version refuses the session's steps rather than run them on another version's weights."""

from __future__ import annotations

import re

VERSION_SEPARATOR = "@"
VERSION_PATTERN = re.compile(r"[1-9][0-9]{0,17}")  # a positive integer without leading zeros


def version_key(name: str, version: int) -> str:
    """The key of `version` of model `name`."""
    return name if version == 1 else f"{name}{VERSION_SEPARATOR}{version}"


def key_parts(key: str) -> tuple[str, int]:
    """(name, version) of a version key."""
    name, separator, version = key.rpartition(VERSION_SEPARATOR)
    if separator and VERSION_PATTERN.fullmatch(version):
        return name, int(version)
    return key, 1


def describe(key: str) -> str:
    """A version key in words, for messages: `version 2 of model 'chat'`."""
    name, version = key_parts(key)
    return f"version {version} of model {name!r}"
