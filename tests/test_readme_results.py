"""The README's results tables are the committed results (``docs/results*/results.md``, written by evaluate.py),
cell for cell: a table pasted by hand, or left behind when the results were made again, fails here."""

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RESULTS_OF_SECTION = {
    "## Results (": "docs/results",
    "### At r = 0.7's cost on six pruning points": "docs/results_six_points",
    "### A budget per image at r = 0.5's cost": "docs/results_cascade",
}
"""The results folder each README section's table comes from, by the start of the section's heading."""


def results_tables(markdown: str) -> list[tuple[str, list[dict[str, str]]]]:
    """Each results table of a Markdown text (its header begins ``| method``) with the heading it follows (outside
    code blocks), its rows as ``{column: cell}``, the cells as printed."""
    lines, heading, tables, in_code = markdown.splitlines(), "", [], False
    for number, line in enumerate(lines):
        in_code ^= line.startswith("```")  # a shell comment in a code block is no heading
        if line.startswith("#") and not in_code:
            heading = line
        if not (line.startswith("| method") and lines[number + 1].startswith("|:")):
            continue
        columns = [cell.strip() for cell in line.strip("|").split("|")]
        rows = []
        for row in lines[number + 2:]:
            if not row.startswith("|"):
                break
            rows.append(dict(zip(columns, (cell.strip() for cell in row.strip("|").split("|")), strict=True)))
        tables.append((heading, rows))
    return tables


def committed_row(folder: str, shown: dict[str, str]) -> dict[str, str]:
    """The row of ``folder``'s results.md that a README row shows: by its method, and its budget where it has the
    column (a table of one budget leaves it out)."""
    (_, rows), = results_tables((ROOT / folder / "results.md").read_text())
    matches = [row for row in rows
               if row["method"] == shown["method"] and row["budget"] == shown.get("budget", row["budget"])]
    assert len(matches) == 1, f"{folder}: {len(matches)} rows match {shown['method']} {shown.get('budget', '')}"
    return matches[0]


README_TABLES = results_tables((ROOT / "README.md").read_text())


def test_every_results_table_of_the_readme_has_its_results_folder():
    headings = [heading for heading, _ in README_TABLES]
    assert [next(folder for start, folder in RESULTS_OF_SECTION.items() if heading.startswith(start))
            for heading in headings] == list(RESULTS_OF_SECTION.values())


@pytest.mark.parametrize(("heading", "rows"), README_TABLES, ids=[heading for heading, _ in README_TABLES])
def test_a_results_table_of_the_readme_is_its_committed_results_cell_for_cell(heading, rows):
    folder = next(folder for start, folder in RESULTS_OF_SECTION.items() if heading.startswith(start))
    for shown in rows:
        committed = committed_row(folder, shown)
        assert shown == {column: committed[column] for column in shown}, f"{folder}: {shown['method']}"
