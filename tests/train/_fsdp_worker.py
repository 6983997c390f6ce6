"""Worker of test_fsdp.py (run by torch.distributed.run, gloo on CPU): the EPIC step with every
decoder and CLIP layer and the root fully sharded (FSDP2), each process on its half of the batch,
against one unsharded process on the whole batch. Each rank writes OUT_DIR/rank<r>.json (files, not
stdout, whose lines the ranks would interleave)."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from epic_ext.models.tiny import build_tiny_llava
from epic_ext.train import synthetic
from epic_ext.train.data import LlavaConversationDataset, collate
from epic_ext.train.schedules import Setting, StepPlan
from epic_ext.train.step import answer_rows
from epic_ext.train.tokenizer import build_tokenizer
from epic_ext.train.trainer import EpicModule


def main():
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    tok = build_tokenizer(1024)
    records = synthetic.generate(2 * world, seed=1)
    ds = LlavaConversationDataset(records, synthetic.render_images(records), tok)
    batch = collate([ds[i] for i in range(len(ds))], pad_id=tok.pad_token_id)
    total = float(len(answer_rows(batch["labels"])[2]))        # global normalizer, as the trainer
    plan = StepPlan(student=Setting(0.75, 2), teacher=Setting(0.5, 3), kl_weight=0.7, temperature=2.0)

    ref = EpicModule(build_tiny_llava("tiny", seed=5), "dart", {})
    loss_ref = ref(batch, plan, total)[0]
    loss_ref.backward()

    sharded = EpicModule(build_tiny_llava("tiny", seed=5), "dart", {})
    inner = sharded.model.model
    for layer in list(inner.language_model.layers) + [m for m in inner.vision_tower.modules() if type(m).__name__ == "CLIPEncoderLayer"]:
        fully_shard(layer)
    fully_shard(sharded)
    mine = {k: v[rank * 2:(rank + 1) * 2] if torch.is_tensor(v) else v for k, v in batch.items()}
    loss = sharded(mine, plan, total)[0]
    (loss * world).backward()          # FSDP averages gradients over ranks; the trainer scales the same way
    summed = loss.detach().clone()
    dist.all_reduce(summed)
    worst, checked, sharded_params = 0.0, 0, 0
    for (name, p), (_, q) in zip(sharded.named_parameters(), ref.named_parameters()):
        if q.grad is None or q.grad.norm() < 1e-6:      # e.g. attention key biases: zero in exact arithmetic
            continue
        g = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        sharded_params += hasattr(p, "full_tensor")
        worst = max(worst, ((g - q.grad).norm() / q.grad.norm()).item())
        checked += 1
    (Path(sys.argv[1]) / f"rank{rank}.json").write_text(json.dumps(
        {"rank": rank, "loss": summed.item(), "loss_ref": loss_ref.item(), "worst_rel_grad_err": worst,
         "checked": checked, "sharded": sharded_params}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
