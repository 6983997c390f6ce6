"""The README's Python example runs as written (on CPU) and its stated shapes hold."""
import pathlib
import re


def test_readme_python_example_runs():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    block = re.search(r"```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    out = scope["out"]
    assert out.counts is not None and out.counts.shape == (16,)
    assert scope["idx"].shape == (16, 64)
    assert scope["merged"].shape == (16, 65, 4096)
