"""Every Python and shell snippet of README.md that needs no network runs as written, offline.

Snippets run in order in one scratch folder holding the repository's ``examples/`` and ``recipes/``
(later snippets read what earlier ones wrote), with ``audiotok`` and ``python`` on the PATH running
this checkout. A snippet is left out only when the line before its fence says why:
``<!-- readme-test: skip (REASON) -->``, REASON naming the network or package installs.
"""

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"(?:<!-- readme-test: skip \((?P<skip>[^)]*)\) -->\n)?```(?P<lang>python|bash)\n(?P<code>.*?)```",
                   re.S)


def snippets() -> list[tuple[str, str, str | None]]:
    """(language, code, reason to skip or None) of each fenced python/bash block, in order."""
    text = (REPO / "README.md").read_text()
    return [(m["lang"], m["code"], m["skip"]) for m in FENCE.finditer(text)]


def test_only_snippets_that_need_the_network_or_installs_are_skipped():
    found = snippets()
    assert len([s for s in found if s[2] is None]) >= 6
    for _, code, skip in found:
        assert skip is None or re.search(r"network|installs", skip), (skip, code)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme")
    for name in ("examples", "recipes"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    bin_dir = root / ".bin"
    bin_dir.mkdir()
    for name, args in (("python", ""), ("audiotok", " -m audiotok")):
        (bin_dir / name).write_text(f'#!/bin/sh\nexec "{sys.executable}"{args} "$@"\n')
        (bin_dir / name).chmod(0o755)
    env = {"PATH": f"{bin_dir}:/usr/bin:/bin", "PYTHONPATH": str(REPO), "HOME": str(root / ".home"),
           "HF_HOME": str(root / ".hf"), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    return root, env


@pytest.mark.parametrize("index", [i for i, s in enumerate(snippets()) if s[2] is None])
def test_readme_snippet_runs(workspace, index):
    root, env = workspace
    lang, code, _ = snippets()[index]
    command = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    proc = subprocess.run(command, cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"README snippet {index} ({lang}) failed:\n{code}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr
