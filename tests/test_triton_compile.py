"""Every Triton kernel compiles for sm_90 (Hopper) without a GPU: the interpreter that runs the
other Triton tests on the CPU never compiles them, so errors only a compiled kernel shows (a
global read inside a kernel, a type or layout error) would otherwise first appear on a GPU.
The script also fails when a kernel has no compile variant."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

triton = pytest.importorskip("triton")
HERE = Path(__file__).parent


def test_kernels_compile_for_sm90(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")      # compile for real, not from a cache
    run = subprocess.run([sys.executable, str(HERE / "triton_aot.py")], env=env, capture_output=True,
                         text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-3000:]
    assert " 0 failed" in run.stdout
