"""The README's Python examples, run as written."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def run_readme_example(section: str) -> None:
    """Run the first ``python`` block of the README's ``## section`` in a namespace of its own, as a reader would
    from the repository root (the caller changes there)."""
    text = (REPO / "README.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", text, re.DOTALL).group(1)
    exec(compile(code, "README.md", "exec"), {})
