"""The README's Python examples run as written (on CPU) and their stated shapes hold."""
import pathlib
import re

import torch


def test_readme_python_examples_run():
    text = (pathlib.Path(__file__).parent.parent / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 2
    scope = {}
    for i, block in enumerate(blocks):
        exec(compile(block, f"README.md python block {i}", "exec"), scope)
    assert scope["out"].counts is not None and scope["out"].counts.shape == (16,)
    assert scope["idx"].shape == (16, 64)
    assert scope["merged"].shape == (16, 65, 4096)
    assert scope["loss"].dim() == 0 and torch.isfinite(scope["loss"])
    assert scope["student"].grad is not None
    assert scope["res"].kept_index.shape == (2, scope["ids"].shape[1] - 576 + 64)
    assert scope["r"].visual_tokens_per_layer == [576, 576, 128, 128]
    assert scope["answer"].shape == (2, scope["ids"].shape[1] + 4)
