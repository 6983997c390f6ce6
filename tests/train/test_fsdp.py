"""FSDP on CPU: accelerate refuses FSDP without an accelerator, so torch's FSDP2 (fully_shard)
runs the EPIC step directly over 2 gloo processes. The shared prefix, the detached teacher and
the fused KL (which reads the LM head's weight inside the root's forward) must give the loss and
gradients of one unsharded process on the same global batch."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

WORKER = Path(__file__).with_name("_fsdp_worker.py")


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed with gloo")
def test_fsdp2_two_processes_match_one(tmp_path):
    port = 29600 + os.getpid() % 1000
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
           str(WORKER), str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    rows = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert sorted(r["rank"] for r in rows) == [0, 1]
    for r in rows:
        assert r["sharded"] > 0 and r["checked"] > 50          # the parameters really were sharded
        assert abs(r["loss"] - r["loss_ref"]) <= 1e-5 * abs(r["loss_ref"])
        assert r["worst_rel_grad_err"] < 1e-4
