"""lmms-eval model ``epic_ext``: any family epic-ext supports, with a token-reduction method.

    python -m lmms_eval --model epic_ext \\
        --model_args pretrained=PATH,method=dart,keep=64,layer=2 --tasks ... --batch_size 8

``pretrained``: a local checkpoint folder (model + processor; LLaVA, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL). ``method`` / ``keep`` / other keys: :func:`epic_ext.apply`'s method and options
(``keep``: a count per image / video frame group, or a ratio; ``layer``: the LLM layer that
drops). Also ``device``, ``dtype``, ``attn_implementation``, ``max_new_tokens`` (when a task sets
none), ``min_pixels`` / ``max_pixels`` (Qwen-VL's image resize bounds), ``max_frames`` (frames
sampled uniformly from a task's video file, default 32 as lmms-eval's Qwen2.5-VL; Qwen-VL models
only; :mod:`epic_ext.eval.video`), ``warmup`` (untimed batches first; default 1 on a GPU, 0 on a
CPU), ``efficiency_json`` (a file for the per-request efficiency records).

Requests run in batches of ``batch_size`` (left padding) through :func:`epic_ext.infer`, which
prefills and decodes with separate timers and reports per request: visual tokens per layer, KV
bytes, prefill FLOPs. Where that lands:

* results JSON, ``throughput``: lmms-eval's only channel for model-side numbers
  (``gen_metrics.log_metrics``; it keeps numeric values and writes their mean as ``avg_<key>``).
  One entry per request: ``avg_visual_tokens`` (before the drop), ``avg_visual_tokens_kept``,
  ``avg_visual_tokens_layer_<i>``, ``avg_kv_bytes``, ``avg_prefill_flops``, ``avg_prefill_ms``
  (the request's batch), ``avg_decode_ms_per_token``, ``avg_prompt_tokens``, ``avg_reduction_layer``.
  Under several processes lmms-eval keeps rank 0's log only; ``clean`` (run on every process
  before the summary) adds the other ranks' entries to it.
* results JSON, per sample ``token_counts`` (input / output tokens, through ``GenerationResult``).
* ``efficiency_json=PATH``: every request's full record (all processes gathered) and the run's
  summary, written when the run ends (``clean``).
"""
from __future__ import annotations

import json
import os
import time
from typing import Optional

import torch
from accelerate import Accelerator
from lmms_eval import utils as lmms_utils
from lmms_eval.api.instance import GenerationResult, TokenCounts
from lmms_eval.api.model import lmms
from tqdm import tqdm

from .runner import ReducedModel, generation_options


class EpicExt(lmms):
    """lmms-eval's view of a :class:`~epic_ext.eval.runner.ReducedModel` (``self.runner``): the
    request plumbing, the throughput log, and the records of several processes gathered."""
    is_simple = True

    def __init__(self, pretrained: str, method: str = "none", keep=None, device: Optional[str] = None,
                 dtype: Optional[str] = None, batch_size=1, max_batch_size=None, max_new_tokens: int = 32,
                 attn_implementation: str = "sdpa", efficiency_json: Optional[str] = None,
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None, warmup: Optional[int] = None,
                 max_frames: int = 32, **method_options) -> None:
        super().__init__()
        if not isinstance(pretrained, str) or not pretrained:
            raise ValueError(f"pretrained: a local checkpoint folder, got {pretrained!r}")
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size: an integer >= 1 ('auto' is not supported), got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: an integer >= 1, got {max_new_tokens!r}")
        if not isinstance(max_frames, int) or isinstance(max_frames, bool) or max_frames < 1:
            raise ValueError(f"max_frames: an integer >= 1, got {max_frames!r}")
        self.max_frames = max_frames

        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            device = accelerator.device               # one process per device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        self.runner = ReducedModel(pretrained, method=method, keep=keep, device=device, dtype=dtype,
                                   attn_implementation=attn_implementation, min_pixels=min_pixels,
                                   max_pixels=max_pixels, warmup=warmup, **method_options)
        self.model_type = self.runner.model_type
        self.max_new_tokens = max_new_tokens
        self.efficiency_json = efficiency_json
        self.throughput: list[dict] = []       # what this process gave log_metrics

    def set_method(self, method: str = "none", keep=None, **options) -> None:
        """Apply another method to the loaded model (the ``epic-ext eval`` grid); clears the records."""
        self.runner.set_method(method, keep, **options)
        self.throughput = []

    # ------------------------------------------------------------------ lmms properties
    @property
    def model(self):
        return self.runner.model

    @property
    def tokenizer(self):
        return self.runner.tokenizer

    @property
    def processor(self):
        return self.runner.processor

    @property
    def config(self):
        return self.runner.model.config

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self.runner.device

    @property
    def records(self) -> list:
        return self.runner.records

    @property
    def method(self) -> str:
        return self.runner.method

    @property
    def keep(self):
        return self.runner.keep

    @property
    def method_options(self) -> dict:
        return self.runner.method_options

    @property
    def warmup(self) -> int:
        return self.runner.warmup

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        """The document's images (PIL) and videos (file paths, decoded and sampled here)."""
        from PIL import Image

        from .video import is_video_path, read_video
        out = []
        for v in doc_to_visual(self.task_dict[task][split][doc_id]) or []:
            if isinstance(v, Image.Image):
                out.append(v.convert("RGB"))
            elif is_video_path(v):
                out.append(read_video(v, self.max_frames))
            else:
                raise ValueError(f"doc_to_visual: task {task!r} gives {type(v).__name__} {str(v)[:80]!r}; the "
                                 "epic_ext model takes images (PIL) and video files")
        return out

    # ------------------------------------------------------------------ generation
    def _log(self, record: dict) -> None:
        """The request's efficiency into lmms-eval's throughput log (results JSON ``throughput``)."""
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        vis = record["visual_tokens_per_layer"]
        n_new = record["new_tokens"]
        # The request's share of its batch's wall time (so summed latencies equal the run's).
        share_s = (record["prefill_ms"] + record["decode_ms_per_token"] * max(n_new - 1, 0)) / 1e3 \
            / record["batch_size"]
        numeric = dict(total_requests=1, visual_tokens=vis[0] if vis else 0, visual_tokens_kept=vis[-1] if vis else 0,
                       kv_bytes=record["kv_bytes"], prefill_flops=record["prefill_flops"],
                       prefill_ms=record["prefill_ms"], decode_ms_per_token=record["decode_ms_per_token"],
                       prompt_tokens=record["prompt_tokens"])
        if record["reduction_layer"] is not None:
            numeric["reduction_layer"] = record["reduction_layer"]
        numeric.update({f"visual_tokens_layer_{i}": n for i, n in enumerate(vis)})
        payload = dict(total_elapsed_time=share_s, total_gen_tokens=n_new,
                       avg_speed=n_new / share_s if share_s > 0 else 0.0, additional_metrics=numeric)
        self.throughput.append(payload)
        log_metrics(**payload)

    def generate_until(self, requests) -> list:
        results = []

        def by_length(args):        # longest first: the first batch shows the memory peak
            return -len(self.tokenizer.encode(args[0])), args[0]

        order = lmms_utils.Collator([r.args for r in requests], by_length, grouping=True)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="epic_ext responding")
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            options, until = generation_options(gen_kwargs[0], self.max_new_tokens)
            images = [self._visuals(f, t, s, d) for f, t, s, d in zip(doc_to_visual, tasks, splits, doc_ids)]
            meta = [dict(task=t, doc_id=d) for t, d in zip(tasks, doc_ids)]
            answers = self.runner.generate(list(contexts), images, until=until, meta=meta, **options)
            for i, (text, record) in enumerate(zip(answers, self.records[-len(answers):])):
                self._log(record)
                results.append(GenerationResult(text=text, token_counts=TokenCounts(
                    input_tokens=record["prompt_tokens"], output_tokens=record["new_tokens"])))
                self.cache_hook.add_partial("generate_until", (contexts[i], gen_kwargs[i]), text)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    def loglikelihood(self, requests) -> list:
        """Per request (context, continuation), one at a time: the continuation's mean negative
        log-likelihood per token under the reduced model, and whether greedy decoding gives it.
        A loss, not a log-probability: lmms-eval's built-in models return the LM loss there and its
        multiple_choice scoring picks the choice of least value (argmin, 0.7.3's api/task.py)."""
        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="epic_ext loglikelihood"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            images = self._visuals(doc_to_visual, task, split, doc_id)
            total, greedy, n_in, n_out = self.runner.loglikelihood(context, continuation, images)
            # lmms-eval 0.7.3's evaluator passes every response through unwrap_generation_output,
            # which turns a bare (float, bool) into its str(); a GenerationResult's text is handed
            # over as it is, so the pair travels in one (multiple-choice tasks then score).
            out.append(GenerationResult(text=(-total / n_out, greedy), token_counts=TokenCounts(
                input_tokens=n_in, output_tokens=n_out)))
        return out

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError("epic_ext: multi-round generation is not supported yet")

    # ------------------------------------------------------------------ end of run
    def efficiency_summary(self, records: Optional[list] = None) -> dict:
        """Means over requests of the efficiency record (visual tokens per layer included)."""
        return self.runner.efficiency_summary(records)

    def _gathered(self) -> list:
        """(records, throughput payloads) of every process, rank order."""
        mine = (self.records, self.throughput)
        if self.world_size > 1 and torch.distributed.is_available() and torch.distributed.is_initialized():
            parts = [None] * self.world_size
            torch.distributed.all_gather_object(parts, mine)
            return parts
        return [mine]

    def clean(self):
        # lmms-eval calls clean() on every process before rank 0 summarises its throughput log,
        # which holds rank 0's requests only: the other ranks' entries are added to it here.
        parts = self._gathered()
        records = [r for part, _ in parts for r in part]
        if self.rank == 0 and len(parts) > 1:
            from lmms_eval.models.model_utils import gen_metrics
            for _, payloads in parts[1:]:
                for payload in payloads:
                    gen_metrics._record_metrics(**payload)
        if self.efficiency_json:
            if self.rank == 0:
                path = os.path.abspath(self.efficiency_json)
                os.makedirs(os.path.dirname(path), exist_ok=True)
                tmp = f"{path}.tmp{os.getpid()}"
                with open(tmp, "w") as f:
                    json.dump({"summary": self.efficiency_summary(records), "requests": records,
                               "written": time.strftime("%Y-%m-%dT%H:%M:%S")}, f, indent=1, default=str)
                os.replace(tmp, path)
        super().clean()


class LmmsHarness:
    """The ``lmms`` harness of ``epic-ext eval`` (see :mod:`epic_ext.eval.grid`): one
    :class:`EpicExt` loaded once, every cell through ``lmms_eval.evaluator.simple_evaluate`` in
    this process (tasks indexed once, ``include_path`` added to lmms-eval's own)."""

    def __init__(self, spec) -> None:
        from lmms_eval.tasks import TaskManager
        self.spec = spec
        self.task_manager = TaskManager("WARNING", include_path=spec.include_path, model_name="epic_ext")
        unknown = [t for t in spec.tasks if t not in self.task_manager.all_tasks]
        if unknown:
            where = f" (nor in include_path {spec.include_path})" if spec.include_path else ""
            raise ValueError(f"tasks: lmms-eval has no task {', '.join(map(repr, unknown))}{where}")
        self.lm = EpicExt(spec.model, device=spec.device, dtype=spec.dtype, batch_size=spec.batch_size,
                          max_new_tokens=spec.max_new_tokens, **spec.model_args)
        self.device = self.lm.device

    @staticmethod
    def version() -> dict:
        from importlib.metadata import version
        return {"lmms_eval": version("lmms-eval")}

    def evaluate(self, cell, method_kwargs: dict) -> dict:
        from lmms_eval.evaluator import simple_evaluate
        from lmms_eval.models.model_utils.gen_metrics import reset_logged_metrics
        self.lm.set_method(cell.method, cell.keep, **method_kwargs)
        reset_logged_metrics()
        # As lmms-eval's own command line: "torchrun" whenever a process group is up (its
        # "accelerate" path gathers a 0-d tensor, which fails on CPU / gloo).
        backend = "torchrun" if torch.distributed.is_available() and torch.distributed.is_initialized() \
            else "accelerate"
        results = simple_evaluate(model=self.lm, tasks=list(self.spec.tasks), batch_size=self.spec.batch_size,
                                  limit=self.spec.limit, task_manager=self.task_manager, log_samples=False,
                                  verbosity="WARNING", distributed_executor_backend=backend)
        records = [r for part, _ in self.lm._gathered() for r in part]
        out = {"scores": {}, "samples": {}, "efficiency": self.lm.efficiency_summary(records)}
        if results is None:         # ranks > 0: lmms-eval returns the results on rank 0 only
            return out
        for task, metrics in results["results"].items():
            out["scores"][task] = {name.removesuffix(",none"): float(value) for name, value in metrics.items()
                                   if "," in name and "_stderr" not in name and isinstance(value, (int, float))
                                   and not isinstance(value, bool)}
            n = results.get("n-samples", {}).get(task, {})
            out["samples"][task] = n.get("effective", n.get("original"))
        return out
