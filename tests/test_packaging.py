"""pyproject's explicit package list: every folder of ours with an `__init__.py` is in it (so a new subpackage
cannot silently stay out of the wheel), and everything in it is such a folder. tests/deploy/test_runtime_install.py
builds the wheel and checks what it installs."""

from __future__ import annotations

import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SETUPTOOLS = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]


def test_the_package_dirs_are_the_namespace():
    assert SETUPTOOLS["package-dir"] == {"cellstream": "cellstream", "cellstream.service": "service",
                                         "cellstream.model": "model", "cellstream.bench": "bench"}


def test_every_package_folder_is_listed_and_every_listed_package_exists():
    listed = SETUPTOOLS["packages"]
    assert len(listed) == len(set(listed))
    found = set()
    for top, folder in SETUPTOOLS["package-dir"].items():
        for init in (REPO / folder).rglob("__init__.py"):
            parts = init.parent.relative_to(REPO / folder).parts
            found.add(".".join((top, *parts)))
    assert sorted(found - set(listed)) == [], "folders with an __init__.py that pyproject's packages leave out"
    assert sorted(set(listed) - found) == [], "listed packages without a folder and __init__.py"
