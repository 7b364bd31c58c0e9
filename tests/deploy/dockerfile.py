"""deploy/Dockerfile as data: its instructions by stage, for the structural checks and cross-checks."""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Instruction:
    keyword: str
    arguments: str

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form ENTRYPOINT, CMD or HEALTHCHECK CMD (AssertionError if shell form)."""
        text = self.arguments.split(" CMD ", 1)[-1] if self.keyword == "HEALTHCHECK" else self.arguments
        assert text.lstrip().startswith("["), f"{self.keyword} must use the exec form: {self.arguments}"
        return json.loads(text)

    def words(self) -> list[str]:
        return shlex.split(self.arguments)


@dataclass
class Stage:
    image: str
    name: str
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def one(self, keyword: str) -> Instruction:
        [instruction] = self.all(keyword)
        return instruction

    def env(self) -> dict[str, str]:
        """ENV variables set in this stage (the `KEY=value ...` form)."""
        values = {}
        for instruction in self.all("ENV"):
            for word in instruction.words():
                key, _, value = word.partition("=")
                values[key] = value
        return values


def logical_lines(text: str) -> list[str]:
    """Lines with `\\` continuations joined, comments and blank lines dropped."""
    lines, current = [], ""
    for raw in text.splitlines():
        stripped = raw.strip()
        if not current and (not stripped or stripped.startswith("#")):
            continue
        if stripped.endswith("\\"):
            current += stripped[:-1] + " "
            continue
        lines.append(current + stripped)
        current = ""
    assert not current, "the Dockerfile ends inside a continued line"
    return lines


def global_args(path: Path) -> dict[str, str]:
    """The ARGs before the first FROM (those FROM lines may use) and their defaults."""
    defaults = {}
    for line in logical_lines(path.read_text()):
        keyword, _, arguments = line.partition(" ")
        if keyword.upper() == "FROM":
            break
        assert keyword.upper() == "ARG", f"{keyword} before the first FROM"
        name, _, default = arguments.strip().partition("=")
        defaults[name] = default
    return defaults


def parse(path: Path) -> list[Stage]:
    """The stages, their FROM images with the global ARGs' defaults substituted."""
    stages: list[Stage] = []
    defaults = global_args(path)
    for line in logical_lines(path.read_text()):
        keyword, _, arguments = line.partition(" ")
        instruction = Instruction(keyword.upper(), " ".join(arguments.split()))
        if instruction.keyword == "FROM":
            words = instruction.words()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else ""
            image = re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: defaults[m.group(1) or m.group(2)], words[0])
            stages.append(Stage(image, name))
            continue
        if stages:
            stages[-1].instructions.append(instruction)
    return stages
