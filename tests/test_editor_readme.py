"""Every ```python block of the README runs as written, against the tiny organism and its world: the
only change made to a block is the embedded names "organism" and "world" (not the ingest format
`fmt="world"`) becoming "organism-tiny" and "world-tiny": the same model and world, small enough for a
test."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).resolve().parents[1] / "README.md"
TINY = {r'"organism"': '"organism-tiny"', r'(?<!fmt=)"world"': '"world-tiny"'}


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(), flags=re.S | re.M)


def test_the_readme_has_python_snippets() -> None:
    assert len(python_blocks()) >= 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_snippet_runs(index: int, tiny_organism: Path, capsys) -> None:
    source = python_blocks()[index]
    for name, tiny in TINY.items():
        source = re.sub(name, tiny, source)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the tiny organism gains nothing from a second thread
    try:
        exec(compile(source, f"README.md python block {index + 1}", "exec"), {"__name__": "readme"})
    finally:
        torch.set_num_threads(threads)
    assert capsys.readouterr().out.strip()  # every snippet prints what it measured
