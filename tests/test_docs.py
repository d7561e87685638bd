"""The docs: a short README, a strict mkdocs build, generated settings pages, a layout that stays true."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel, Field

from compeff.settings_doc import field_rows, section_page, settings_pages, undocumented_fields

REPO = Path(__file__).resolve().parent.parent


def test_every_setting_has_a_description():
    assert undocumented_fields() == []

    class Probe(BaseModel):  # the check itself finds a field without one
        said: int = Field(1, description="described")
        silent: int = 2

    assert [key for key, _, _, text in field_rows(Probe, "probe") if not text] == ["probe.silent"]


def test_settings_pages_come_from_the_schema():
    pages = settings_pages()
    assert "settings/teacher.md" in pages and "settings/index.md" in pages
    page = section_page("teacher")
    assert "| `teacher.serve.engine` |" in page and '"none" \\| "vllm" \\| "llamacpp"' in page
    assert "| `teacher.max_tokens` | int | `512` |" in page


def test_readme_is_short_and_starts_with_the_two_commands():
    lines = (REPO / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 250
    head = "\n".join(lines[:12])
    assert "compeff run recipes/quickstart.yaml" in head and "python -m pytest -q" in head


def test_the_layout_lists_every_module():
    design = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    block = design.split("## Layout", 1)[1]
    listed, folder = set(), None
    for line in block.splitlines():
        m = re.match(r"^( *)(\S+)", line)
        if not m or line.startswith("```"):
            continue
        indent, name = len(m.group(1)), m.group(2)
        if indent == 2:
            folder = name if name.endswith("/") else None
            listed.add(name)
        elif indent == 4 and folder:
            listed.add(folder + name)
    modules = {str(p.relative_to(REPO / "compeff")) for p in (REPO / "compeff").rglob("*.py")}
    assert sorted(modules - listed) == []
    stale = sorted(n for n in listed if n.endswith(".py") and n not in modules)
    assert stale == []


@pytest.mark.skipif(
    shutil.which("mkdocs", path=str(Path(sys.executable).parent)) is None, reason="mkdocs not installed"
)
def test_docs_build_strict(tmp_path):
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent))  # installed by .[dev]
    assert mkdocs, "mkdocs is missing: pip install -e '.[dev]'"
    env = {**os.environ, "DISABLE_MKDOCS_2_WARNING": "true", "NO_MKDOCS_2_WARNING": "1"}
    done = subprocess.run([mkdocs, "build", "--strict", "-d", str(tmp_path / "site")], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    settings = (tmp_path / "site" / "settings" / "generate" / "index.html").read_text(encoding="utf-8")
    assert "generate.n_samples" in settings
