"""The README's Python examples run, in order, in one namespace."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 6
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["monitor"].epoch_scores and len(namespace["accumulator"].samples_per_step) >= 1


def test_readme_transformers_blocks_run():
    """Blocks fenced as `python transformers` (rendered as Python) need transformers: run apart."""
    pytest.importorskip("transformers")
    blocks = re.findall(r"```python transformers\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    assert namespace["losses"].shape == (8,) and namespace["stats"].cosines.shape == (8,)
