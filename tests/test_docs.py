"""The README is a map: its links and anchors resolve, it stays short, and CI runs the test
command it gives."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "benchmarks" / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
INSTALL = 'python3 -m venv .venv && . .venv/bin/activate && pip install -e ".[dev]"'


def anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_links_resolve(page):
    for link in re.findall(r"\]\(([^)\s]+)\)", page.read_text()):
        if link.startswith(("http://", "https://")):
            continue
        path, _, fragment = link.partition("#")
        target = (page.parent / path).resolve() if path else page
        assert target.exists(), f"{page.name}: {link} does not exist"
        if fragment and target.suffix == ".md":
            headings = [anchor(line.lstrip("#")) for line in target.read_text().splitlines()
                        if line.startswith("#")]
            assert fragment in headings, f"{page.name}: no heading #{fragment} in {target.name}"


def test_readme_is_a_map_with_the_two_set_up_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert f"{INSTALL} && launch/train.sh output_dir=runs/demo" in text
    assert f"{INSTALL} && python -m pytest -q" in text
    assert 'python -m pytest -m "not slow"' in text


def test_ci_runs_the_readme_test_command():
    lines = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    assert lines[-1] == "python -m pytest -q"
    assert 'pip install --quiet -e ".[dev]"' in lines
