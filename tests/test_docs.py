"""The README and docs/ name only real settings and link only to files that exist."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from service.config import Settings

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").rglob("*.md"))]
# Make variables with the prefix, not settings: `make uniguard UNIGUARD_ARGS=...`.
NOT_SETTINGS = {"ARGS"}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_every_setting_named_is_a_real_setting(page: Path) -> None:
    fields = set(Settings.model_fields)
    names = set(re.findall(r"\bUNIGUARD_([A-Z0-9_]+[A-Z0-9])\b", page.read_text()))
    unknown = sorted(n for n in names - NOT_SETTINGS if n.lower() not in fields)
    assert not unknown, f"{page.name} names settings that do not exist: {unknown}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page: Path) -> None:
    broken = []
    for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
        if "://" not in target and not (page.parent / target).exists():
            broken.append(target)
    assert not broken, f"{page.name} links to missing files: {broken}"


def test_readme_stays_a_product_page() -> None:
    assert len((REPO / "README.md").read_text().splitlines()) <= 250
