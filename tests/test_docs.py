"""The docs' case tables name tests that exist: a renamed or removed test fails here, not
silently."""

import pathlib
import re

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
DOCS = [ROOT / "docs" / "robustness.md"]


def _named_tests(doc: pathlib.Path) -> list[tuple[str, str]]:
  return re.findall(r"`(tests/[\w/]+\.py)::(\w+)`", doc.read_text(encoding="utf-8"))


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_case_names_an_existing_test(doc):
  named = _named_tests(doc)
  assert len(named) >= 10
  for path, name in named:
    source = (ROOT / path).read_text(encoding="utf-8")
    assert re.search(
        rf"^def {name}\(", source, re.MULTILINE
    ), f"{doc.name} names {path}::{name}, which does not exist"
