"""Backend discovery, automatic choice and forcing (epic_ext/_backend.py)."""
import pytest
import torch

import epic_ext
from epic_ext import _backend


def test_backends_report_every_name_with_a_reason():
    info = epic_ext.backends()
    assert set(info) == {"cpu", "cuda", "triton", "reference"}
    for name, entry in info.items():
        assert isinstance(entry["available"], bool) and entry["reason"], name
    assert info["reference"]["available"]


def test_automatic_choice_for_cpu_tensors():
    expected = "cpu" if epic_ext.backends()["cpu"]["available"] else "reference"
    assert _backend.resolve(torch.device("cpu")) == expected


def test_forcing_by_argument_context_and_env(monkeypatch):
    scores = torch.randn(3, 11)
    calls = []
    real = _backend.kernel

    def spy(op, device):
        fn, name = real(op, device)
        calls.append(name)
        return fn, name

    monkeypatch.setattr(_backend, "kernel", spy)
    epic_ext.select_topk(scores, 4, backend="reference")
    with epic_ext.use_backend("reference"):
        epic_ext.select_topk(scores, 4)
    monkeypatch.setenv("EPIC_EXT_BACKEND", "reference")
    epic_ext.select_topk(scores, 4)
    assert calls == ["reference"] * 3
    monkeypatch.delenv("EPIC_EXT_BACKEND")
    epic_ext.select_topk(scores, 4)
    assert calls[-1] == _backend.resolve(scores.device)


def test_bad_backend_names_and_impossible_choices():
    scores = torch.randn(2, 5)
    with pytest.raises(ValueError, match="backend must be one of"):
        epic_ext.select_topk(scores, 2, backend="numpy")
    with pytest.raises(RuntimeError, match="cuda"):
        epic_ext.select_topk(scores, 2, backend="cuda")  # CPU tensors never run on CUDA kernels


def test_each_backend_gives_the_same_answer():
    gen = torch.Generator().manual_seed(0)
    tokens, scores = torch.randn(2, 50, 7, generator=gen), torch.randn(2, 50, generator=gen)
    want = epic_ext.compress(tokens, scores, 9, backend="reference")
    for name, entry in epic_ext.backends().items():
        if not entry["available"] or not _backend._runs_on(name, tokens.device):
            continue
        got = epic_ext.compress(tokens, scores, 9, backend=name)
        assert torch.equal(got.indices, want.indices), name
        torch.testing.assert_close(got.tokens, want.tokens, atol=1e-5, rtol=1e-5)
