"""Prose names only files that exist: every repository path in a docstring, comment or document resolves.

A path counts when its first segment is a top-level entry of the repository (``tests/core/test_x.py``,
``docs/runbooks.md``, ``deploy/helm/...``) or one of the packages (``modcache/wiring.py`` is looked up under
``src/``, ``operator/`` and ``consumer/``). A Markdown file named in any other way (``runbooks.md``,
``shared/reference/x.md``) must exist somewhere in the repository under that name: documents outside it (the
original plan's references) cannot be read by the people who read ours.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_HOMES = {"modcache": "src", "modcache_operator": "operator", "modcache_consumer": "consumer"}
TEXT_SUFFIXES = {".py", ".md", ".yaml", ".yml", ".tpl", ".txt", ".toml", ".cfg", ""}
CANDIDATE = re.compile(r"(?<![\w./-])((?:\.?[\w-]+/)*[\w.-]+\.(?:md|py|yaml|yml|json|toml|txt|tpl|sh))(?![\w/])")


def tracked_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    return [ROOT / line for line in listed.splitlines() if Path(line).suffix in TEXT_SUFFIXES]


def markdown_names(files: list[Path]) -> set[str]:
    return {f.name for f in files if f.suffix == ".md"}


def resolves(token: str, top_level: set[str]) -> bool | None:
    """True/False for a repository path that exists or not; None if ``token`` is not a repository path."""
    first = token.split("/", 1)[0]
    if first in top_level and "/" in token:
        return (ROOT / token).exists()
    if first in PACKAGE_HOMES and token.endswith(".py"):
        return (ROOT / PACKAGE_HOMES[first] / token).exists()
    return None


def dangling(name: str, text: str, top_level: set[str], documents: set[str]) -> list[str]:
    found = []
    for number, line in enumerate(text.splitlines(), 1):
        for token in CANDIDATE.findall(line):
            token = token.removeprefix("./")
            exists = resolves(token, top_level)
            if exists is None and token.endswith(".md"):
                exists = token.rsplit("/", 1)[-1] in documents
            if exists is False:
                found.append(f"{name}:{number}: {token}")
    return found


def test_every_named_repository_path_exists() -> None:
    files = [f for f in tracked_files() if f != Path(__file__).resolve()]  # this file's examples are made up
    top_level = {p.name for p in ROOT.iterdir()} - {".git", ".venv"}
    documents = markdown_names(files)
    missing = [
        problem
        for f in files
        for problem in dangling(str(f.relative_to(ROOT)), f.read_text(errors="replace"), top_level, documents)
    ]
    assert not missing, "prose names files that do not exist:\n" + "\n".join(missing)


def test_the_check_sees_a_dangling_path() -> None:
    """The check above can fail: a docstring citing a test module and a document that are not there."""
    text = '"""Checked by ``tests/core/test_no_such_module.py`` (see bifrost-nowhere.md, docs/runbooks.md)."""'
    top_level = {p.name for p in ROOT.iterdir()}
    found = dangling("probe.py", text, top_level, markdown_names(tracked_files()))
    assert found == ["probe.py:1: tests/core/test_no_such_module.py", "probe.py:1: bifrost-nowhere.md"]
