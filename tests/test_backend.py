"""Backend discovery, automatic choice and forcing (epic_ext/_backend.py)."""
import pytest
import torch

import epic_ext
from epic_ext import _backend
from conftest import kernels_resolved


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
    with kernels_resolved() as calls:
        epic_ext.select_topk(scores, 4, backend="reference")
        with epic_ext.use_backend("reference"):
            epic_ext.select_topk(scores, 4)
        monkeypatch.setenv("EPIC_EXT_BACKEND", "reference")
        epic_ext.select_topk(scores, 4)
        assert [name for _, name in calls] == ["reference"] * 3
        monkeypatch.delenv("EPIC_EXT_BACKEND")
        epic_ext.select_topk(scores, 4)
    assert calls[-1][1] == _backend.resolve(scores.device)


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


# ---------------------------------------------------------------------------------------------
# The backward runs on the backend the forward ran on (forcing is per thread; autograd may run
# the backward on its own thread, as it does for CUDA tensors).

def _count_reference_backward(monkeypatch):
    from epic_ext import reference
    calls = []
    real = reference.gather_merge_backward

    def counting(*args):
        calls.append(args[0].shape)
        return real(*args)

    monkeypatch.setattr(reference, "gather_merge_backward", counting)
    return calls


def _differentiable_calls(backend=None):
    """(name, loss) for each differentiable compress-family call, forced by `backend=` or not."""
    gen = torch.Generator().manual_seed(21)
    tokens = torch.randn(2, 13, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    weights = torch.rand(2, 13, generator=gen, dtype=torch.float64, requires_grad=True)
    scores = torch.randn(2, 13, generator=gen)
    idx = torch.tensor([[0, 4, 7], [2, 3, 12]])
    counts = torch.tensor([3, 1])
    return [
        ("compress", epic_ext.compress(tokens, scores, 4, backend=backend).tokens),
        ("compress iqr", epic_ext.compress(tokens, scores, "iqr", backend=backend).tokens),
        ("compress weighted", epic_ext.compress(tokens, scores, 4, "weighted", weights=weights,
                                                backend=backend).tokens),
        ("gather_merge", epic_ext.gather_merge(tokens, idx, counts=counts, backend=backend)),
    ]


def _backward_all(outputs):
    for _, out in outputs:
        (out * torch.linspace(-1, 2, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()


def test_backward_runs_on_the_backend_forced_by_argument(monkeypatch):
    calls = _count_reference_backward(monkeypatch)
    outputs = _differentiable_calls(backend="reference")
    _backward_all(outputs)
    assert len(calls) == len(outputs)


def test_backward_runs_on_the_backend_forced_by_use_backend(monkeypatch):
    calls = _count_reference_backward(monkeypatch)
    with epic_ext.use_backend("reference"):
        outputs = _differentiable_calls()
    _backward_all(outputs)  # outside the forcing
    assert len(calls) == len(outputs)


def test_backward_runs_on_the_backend_forced_by_environment(monkeypatch):
    calls = _count_reference_backward(monkeypatch)
    monkeypatch.setenv("EPIC_EXT_BACKEND", "reference")
    outputs = _differentiable_calls()
    monkeypatch.delenv("EPIC_EXT_BACKEND")
    _backward_all(outputs)
    assert len(calls) == len(outputs)


def test_backward_on_another_thread_than_the_forcing(monkeypatch):
    import threading
    calls = _count_reference_backward(monkeypatch)
    # Forward forced in the main thread, backward on a thread that knows nothing of it.
    with epic_ext.use_backend("reference"):
        outputs = _differentiable_calls()
    worker = threading.Thread(target=_backward_all, args=(outputs,))
    worker.start()
    worker.join()
    assert len(calls) == len(outputs)
    # Forward forced on a worker thread, backward in the main thread.
    calls.clear()
    made = []
    worker = threading.Thread(target=lambda: made.extend(_differentiable_calls("reference")))
    worker.start()
    worker.join()
    _backward_all(made)
    assert len(calls) == len(made)


def test_unforced_backward_ignores_a_later_forcing(monkeypatch):
    """The backward follows the forward's backend, not a forcing around `.backward()`."""
    if not epic_ext.backends()["cpu"]["available"]:
        pytest.skip("needs a second CPU backend")
    calls = _count_reference_backward(monkeypatch)
    outputs = _differentiable_calls()
    with epic_ext.use_backend("reference"):
        _backward_all(outputs)
    assert calls == []


def test_kl_backward_calls_no_kernel():
    """kl_div and fused_linear_kl compute the gradient in the forward (on the forced backend);
    their backward only scales it, so no backend choice happens after the forward."""
    gen = torch.Generator().manual_seed(22)
    student = torch.randn(3, 11, generator=gen, requires_grad=True)
    teacher = torch.randn(3, 11, generator=gen)
    hidden = torch.randn(3, 6, generator=gen, requires_grad=True)
    weight = torch.randn(11, 6, generator=gen, requires_grad=True)
    with kernels_resolved() as calls:
        loss = epic_ext.kl_div(student, teacher, backend="reference") + \
            epic_ext.fused_linear_kl(hidden, hidden.detach() + 0.1, weight, backend="reference")
    assert calls and all(name == "reference" for _, name in calls)
    with kernels_resolved() as calls:
        loss.backward()
    assert calls == []


def test_backend_argument_traces_under_torch_compile_in_a_fresh_thread():
    """Dynamo guards on the forcing state it reads: reading it must not depend on whether this
    thread ever forced a backend (a class-level default failed with 'Guard failed on the same
    frame'). Dynamo only (backend="eager"): the graph is what matters, not the code generation."""
    import threading
    gen = torch.Generator().manual_seed(23)
    tokens, scores = torch.randn(2, 9, 4, generator=gen), torch.randn(2, 9, generator=gen)
    torch._dynamo.reset()
    fn = torch.compile(lambda t, s: epic_ext.compress(t, s, 4, backend="reference").tokens,
                       backend="eager", fullgraph=True)
    result = []
    # Twice: the first call's forcing leaves the state in the thread's dict, which a guard on
    # its absence rejected on the second call.
    worker = threading.Thread(target=lambda: result.extend([fn(tokens, scores), fn(tokens, scores)]))
    worker.start()
    worker.join()
    assert len(result) == 2, "the compiled call raised (see the thread's traceback above)"
    torch.testing.assert_close(result[1], epic_ext.compress(tokens, scores, 4).tokens)
    torch._dynamo.reset()


def test_forcing_reaches_the_compiled_graph(monkeypatch):
    """Under torch.compile a forcing inside the compiled function (backend=) exists only while
    tracing: the backend travels into the graph as an argument of the op, so the forward and
    the backward run on it when the graph runs."""
    from epic_ext import reference
    forward_calls = []
    real_forward = reference.compress_topk

    def counting(*args):
        forward_calls.append(1)
        return real_forward(*args)

    monkeypatch.setattr(reference, "compress_topk", counting)
    backward_calls = _count_reference_backward(monkeypatch)
    gen = torch.Generator().manual_seed(24)
    tokens = torch.randn(2, 9, 4, generator=gen, requires_grad=True)
    scores = torch.randn(2, 9, generator=gen)
    torch._dynamo.reset()
    fn = torch.compile(lambda t, s: epic_ext.compress(t, s, 4, backend="reference").tokens,
                       backend="eager", fullgraph=True)
    forward_calls.clear()
    out = fn(tokens, scores)
    out.sum().backward()
    torch._dynamo.reset()
    assert len(forward_calls) >= 1 and len(backward_calls) == 1
