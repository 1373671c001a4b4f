"""The README's Python examples run, in order, in one namespace (the docs' pages: test_docs.py)."""
from pathlib import Path

from tests.support.markdown import blocks, run_blocks

README = Path(__file__).resolve().parent.parent / "README.md"


def test_readme_python_blocks_run():
    readme_blocks = blocks(README)
    assert len(readme_blocks) == 2 and not any(b.skip or b.requires for b in readme_blocks)
    namespace = run_blocks(README, readme_blocks)
    assert namespace["stats"].cosines.shape == (64,)
    assert namespace["gasw"].steps == 5 and namespace["gasw"].fallbacks == 0
