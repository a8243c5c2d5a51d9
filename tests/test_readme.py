"""The README's headline results table: every number in it equals the committed result file its
cell cites. The mapping is explicit, in the `headline-sources` HTML comment above the table (one
line per cell: ROW :: COLUMN :: FILE#PATH [/ FILE#PATH], several numbers in a cell separated by
` ; `), so rows can be swapped for new results by editing the comment and the row together."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
NUMBER = re.compile(r"(?<![\w.])\d[\d,]*(?:\.\d+)?")


def readme() -> str:
    return (ROOT / "README.md").read_text(encoding="utf-8")


def headline() -> tuple[dict[tuple[str, str], str], dict[tuple[str, str], str]]:
    """({(row, column): cell text}, {(row, column): source expression})."""
    text = readme()
    comment = re.search(r"<!-- headline-sources[^\n]*\n(.*?)-->", text, re.S)
    assert comment, "README.md lacks the headline-sources comment"
    sources = {}
    for line in comment.group(1).strip().splitlines():
        row, column, expression = (part.strip() for part in line.split(" :: "))
        sources[(row, column)] = expression
    table = text[comment.end():].lstrip("\n").split("\n\n")[0].splitlines()
    header = [c.strip() for c in table[0].strip("|").split("|")]
    cells = {}
    for line in table[2:]:
        values = [c.strip() for c in line.strip("|").split("|")]
        for column, value in zip(header[1:], values[1:]):
            cells[(values[0], column)] = re.sub(r"\[([^]]*)\]\([^)]*\)", r"\1", value)
    return cells, sources


def resolve(term: str) -> float:
    """FILE#a.b.0.c[|mean|MiB]: the JSON value at that path, optionally the mean of a list or bytes in MiB."""
    target, _, path = term.partition("#")
    path, *ops = path.split("|")
    value = json.loads((ROOT / target).read_text())
    for key in path.split("."):
        value = value[int(key)] if isinstance(value, list) else value[key]
    for op in ops:
        value = {"mean": lambda v: sum(v) / len(v), "MiB": lambda v: v / 2**20}[op](value)
    return float(value)


def evaluate(expression: str) -> float:
    parts = [resolve(t.strip()) for t in expression.split(" / ")]
    return parts[0] / parts[1] if len(parts) == 2 else parts[0]


def test_every_headline_number_is_the_value_of_the_file_it_cites():
    cells, sources = headline()
    assert cells and set(sources) <= set(cells), sorted(set(sources) - set(cells))
    checked = 0
    for key, text in cells.items():
        numbers = NUMBER.findall(text)
        if not numbers:
            assert "not measured" in text, (key, text)
            continue
        assert key in sources, f"{key}: {text!r} cites no result file in headline-sources"
        expressions = sources[key].split(" ; ")
        assert len(expressions) == len(numbers), (key, text, expressions)
        for shown, expression in zip(numbers, expressions):
            decimals = len(shown.partition(".")[2])
            assert round(evaluate(expression), decimals) == float(shown.replace(",", "")), (key, shown, expression)
            checked += 1
    assert checked >= 10


def test_every_cited_file_is_linked_from_its_cell_and_committed():
    cells, sources = headline()
    text = readme()
    for key, expression in sources.items():
        for term in expression.replace(" ; ", " / ").split(" / "):
            target = term.partition("#")[0].strip()
            assert (ROOT / target).is_file(), target
            assert f"]({target})" in text, f"{key}: no link to {target}"


def test_the_readme_is_short_and_its_links_resolve():
    text = readme()
    assert len(text.splitlines()) <= 400
    for target in re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", text):
        assert (ROOT / target).exists(), target
