"""The CUDA build decision (epic_ext/cuda_build.py, used by setup.py) and the loud warning when a
GPU is visible but epic_ext._C has no CUDA kernels (`epic-ext info`, `make build`)."""
import types

import pytest
import torch

from epic_ext import cuda_build


@pytest.mark.parametrize("mode", ["auto", "AUTO", "1"])
def test_matching_major_versions_build_cuda(mode):
    build, reason = cuda_build.decide(mode, "13.0", (13, 2), "/usr/local/cuda")
    assert build and "nvcc 13.2" in reason and "13.0" in reason


def test_auto_with_mismatched_nvcc_builds_cpu_only_and_says_why():
    build, reason = cuda_build.decide("auto", "13.0", (12, 8), "/opt/cuda-12.8")
    assert not build
    assert "nvcc 12.8" in reason and "torch's CUDA 13.0" in reason and "/opt/cuda-12.8" in reason


@pytest.mark.parametrize("torch_cuda,nvcc,words", [
    ("13.0", (12, 8), "does not match"),
    (None, (13, 0), "not a CUDA build"),
    ("13.0", None, "no nvcc"),
])
def test_forced_cuda_fails_with_the_reason(torch_cuda, nvcc, words):
    with pytest.raises(ValueError, match="EPIC_EXT_CUDA=1") as e:
        cuda_build.decide("1", torch_cuda, nvcc, "/usr/local/cuda")
    assert words in str(e.value)


def test_disabled_and_bad_modes():
    assert cuda_build.decide("0", "13.0", (13, 0), "/usr/local/cuda") == (False, "EPIC_EXT_CUDA=0")
    with pytest.raises(ValueError, match="EPIC_EXT_CUDA must be auto, 0 or 1"):
        cuda_build.decide("yes", "13.0", (13, 0), "/usr/local/cuda")


def test_setup_uses_the_shared_decision_and_nvcc_headers_first():
    """setup.py cannot be imported (it runs the build): check that it calls the shared decision
    and puts nvcc's include folder before the pip wheels' CUDA headers."""
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "setup.py").read_text()
    assert "cuda_build.decide(" in text
    assert 'os.path.join(cpp_extension.CUDA_HOME, "include")] + nvidia_include_dirs()' in text


def fake_gpu(monkeypatch, has_cuda_kernels, nvcc=(12, 8), torch_cuda="13.0"):
    """A visible 'GPU' on this CPU machine, and an epic_ext._C with or without CUDA kernels."""
    from epic_ext import _C
    props = types.SimpleNamespace(major=9, minor=0, total_memory=141 << 30,
                                  multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "NVIDIA H200")
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda *a: props)
    monkeypatch.setattr(torch.version, "cuda", torch_cuda)
    monkeypatch.setattr(_C, "has_cuda", has_cuda_kernels)
    monkeypatch.setattr(cuda_build, "nvcc_version", lambda home: nvcc)


def test_info_warns_when_a_gpu_is_visible_without_cuda_kernels(monkeypatch, capsys):
    from epic_ext import cli
    fake_gpu(monkeypatch, has_cuda_kernels=False)
    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "WARNING: NVIDIA H200 is visible but epic_ext._C has NO CUDA kernels" in out
    assert "nvcc 12.8" in out and "does not match torch's CUDA 13.0" in out
    assert "fix:" in out and "EPIC_EXT_CUDA=1" in out and "CUDA 13.x" in out
    # the warning comes last, where it is seen
    assert out.rstrip().splitlines()[-1].startswith("!!!")


def test_info_is_quiet_with_cuda_kernels_or_without_a_gpu(monkeypatch, capsys):
    from epic_ext import cli
    assert cli.main(["info"]) == 0  # this machine: no GPU
    assert "WARNING" not in capsys.readouterr().out
    fake_gpu(monkeypatch, has_cuda_kernels=True)
    assert cli.main(["info"]) == 0
    assert "WARNING" not in capsys.readouterr().out


def test_warning_names_a_build_without_cuda_when_the_toolkit_matches(monkeypatch):
    fake_gpu(monkeypatch, has_cuda_kernels=False, nvcc=(13, 0))
    block = cuda_build.gpu_without_cuda_kernels()
    assert "built without them" in block and "EPIC_EXT_CUDA=1" in block
