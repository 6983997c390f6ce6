"""lmms-eval model ``epic_ext``: any family epic-ext supports, with a token-reduction method.

    python -m lmms_eval --model epic_ext \\
        --model_args pretrained=PATH,method=dart,keep=64,layer=2 --tasks ... --batch_size 8

``pretrained``: a local checkpoint folder (model + processor; LLaVA, Qwen2-VL, Qwen2.5-VL,
Qwen3-VL). ``method`` / ``keep`` / other keys: :func:`epic_ext.apply`'s method and options
(``keep``: a count per image / video frame group, or a ratio; ``layer``: the LLM layer that
drops). Also ``device``, ``dtype``, ``attn_implementation``, ``max_new_tokens`` (when a task sets
none), ``min_pixels`` / ``max_pixels`` (Qwen-VL's image resize bounds), ``warmup`` (untimed
batches first; default 1 on a GPU, 0 on a CPU), ``efficiency_json`` (a file for the per-request
efficiency records).

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

from ..models.loading import QWEN_VL_TYPES, check_model_type, load_model, load_processor

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def _keep_value(keep):
    """model_args arrive parsed by lmms-eval (ints, floats, bools, strings): a count, a ratio,
    'iqr'-like method strings, or None."""
    if keep is None or isinstance(keep, (int, float)) and not isinstance(keep, bool):
        return keep
    if isinstance(keep, str):
        return None if keep.lower() == "none" else keep
    raise TypeError(f"keep: expected a count, a ratio or None, got {keep!r}")


class EpicExt(lmms):
    is_simple = True

    def __init__(self, pretrained: str, method: str = "none", keep=None, device: Optional[str] = None,
                 dtype: Optional[str] = None, batch_size=1, max_batch_size=None, max_new_tokens: int = 32,
                 attn_implementation: str = "sdpa", efficiency_json: Optional[str] = None,
                 min_pixels: Optional[int] = None, max_pixels: Optional[int] = None, warmup: Optional[int] = None,
                 **method_options) -> None:
        super().__init__()
        from ..models import apply

        if not isinstance(pretrained, str) or not pretrained:
            raise ValueError(f"pretrained: a local checkpoint folder, got {pretrained!r}")
        self.model_type = check_model_type(pretrained)
        try:
            self.batch_size_per_gpu = int(batch_size)
        except (TypeError, ValueError):
            raise ValueError(f"batch_size: an integer >= 1 ('auto' is not supported), got {batch_size!r}") from None
        if self.batch_size_per_gpu < 1:
            raise ValueError(f"batch_size: must be >= 1, got {batch_size}")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: an integer >= 1, got {max_new_tokens!r}")
        if dtype is not None and dtype not in _DTYPES:
            raise ValueError(f"dtype: one of {', '.join(_DTYPES)}, got {dtype!r}")
        if not isinstance(method, str):
            raise TypeError(f"method: a method name, got {method!r}")

        accelerator = Accelerator()
        self.accelerator = accelerator
        if accelerator.num_processes > 1:
            self._device = accelerator.device         # one process per device
            self._rank = accelerator.process_index
            self._world_size = accelerator.num_processes
        else:
            if device is None:
                device = "cuda" if torch.cuda.is_available() else "cpu"
            try:
                self._device = torch.device(device)
            except RuntimeError as e:
                raise ValueError(f"device: {e}") from None
            if self._device.type == "cuda" and not torch.cuda.is_available():
                raise ValueError(f"device: {device!r} but no CUDA device is visible")

        self.processor = load_processor(pretrained)
        self._tokenizer = self.processor.tokenizer
        self._tokenizer.padding_side = "left"
        if min_pixels is not None or max_pixels is not None:
            self._set_pixel_range(min_pixels, max_pixels)
        self._model = load_model(pretrained, dtype=None if dtype is None else _DTYPES[dtype],
                                 attn_implementation=attn_implementation, device=self._device)
        self.method = method.lower()
        self.keep = _keep_value(keep)
        self.method_options = dict(method_options)
        # Applied once here (bad options raise now, naming them); every batch then runs with it.
        apply(self._model, self.method, keep=self.keep, **self.method_options)
        self.max_new_tokens = max_new_tokens
        self.efficiency_json = efficiency_json
        from ..inference import default_warmup
        if warmup is not None and (not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0):
            raise ValueError(f"warmup: an integer >= 0, got {warmup!r}")
        # Untimed batches before the first timed one (a GPU's first call pays for its context).
        self.warmup = default_warmup(self._device) if warmup is None else warmup
        self.records: list[dict] = []
        self.throughput: list[dict] = []       # what this process gave log_metrics

    # ------------------------------------------------------------------ lmms properties
    @property
    def model(self):
        return self._model

    @property
    def tokenizer(self):
        return self._tokenizer

    @property
    def config(self):
        return self._model.config

    @property
    def batch_size(self):
        return self.batch_size_per_gpu

    @property
    def device(self):
        return self._device

    def _set_pixel_range(self, min_pixels, max_pixels) -> None:
        """Qwen-VL's resize bounds (image area in pixels; the checkpoint's own by default; lmms-eval's
        built-in Qwen2.5-VL model uses max_pixels=1605632)."""
        if self.model_type not in QWEN_VL_TYPES:
            raise ValueError(f"min_pixels / max_pixels: Qwen-VL models only, not {self.model_type}")
        size = self.processor.image_processor.size
        bounds = {"shortest_edge": size.shortest_edge, "longest_edge": size.longest_edge}
        for name, value, key in (("min_pixels", min_pixels, "shortest_edge"),
                                 ("max_pixels", max_pixels, "longest_edge")):
            if value is None:
                continue
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name}: a positive pixel count, got {value!r}")
            bounds[key] = value
        if bounds["shortest_edge"] > bounds["longest_edge"]:
            raise ValueError(f"min_pixels: {bounds['shortest_edge']} exceeds max_pixels {bounds['longest_edge']}")
        self.processor.image_processor.size = bounds

    # ------------------------------------------------------------------ prompts
    def _prompt(self, context: str, n_images: int) -> str:
        """One user turn: the images, then the question (lmms-eval contexts may carry their own
        ``<image>`` tags; they are dropped as the built-in models do)."""
        context = context.replace("<image>", "").strip()
        if self.model_type in QWEN_VL_TYPES:
            content = [{"type": "image"} for _ in range(n_images)] + [{"type": "text", "text": context}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
        # LLaVA-1.5's conversation format (as `epic-ext infer` and the trainer's prompts).
        tag = getattr(self.processor, "image_token", "<image>")
        return "USER: " + f"{tag}\n" * n_images + f"{context} ASSISTANT:"

    def _visuals(self, doc_to_visual, task, split, doc_id) -> list:
        from PIL import Image
        visuals = doc_to_visual(self.task_dict[task][split][doc_id]) or []
        for v in visuals:
            if not isinstance(v, Image.Image):
                raise ValueError(f"doc_to_visual: task {task!r} gives a {type(v).__name__}; the epic_ext model "
                                 "takes images (PIL) only so far")
        return [v.convert("RGB") for v in visuals]

    def _inputs(self, prompts: list, images: list) -> dict:
        flat = [im for row in images for im in row]
        out = self.processor(text=prompts, images=flat or None, padding=True, return_tensors="pt")
        return dict(out)

    # ------------------------------------------------------------------ generation
    def _gen_options(self, gen_kwargs: dict) -> tuple[dict, list]:
        gen_kwargs = dict(gen_kwargs or {})
        until = gen_kwargs.pop("until", None) or []
        if isinstance(until, str):
            until = [until]
        if not isinstance(until, list):
            raise ValueError(f"gen_kwargs: 'until' must be a string or a list, got {type(until).__name__}")
        temperature = float(gen_kwargs.get("temperature") or 0.0)
        do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
        options = dict(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or self.max_new_tokens),
                       do_sample=do_sample, temperature=temperature if do_sample else 1.0,
                       top_k=gen_kwargs.get("top_k"))
        return options, [u for u in until if u]

    def _run_batch(self, prompts: list, images: list, options: dict) -> list[dict]:
        """Per request: its answer ids and its efficiency record."""
        from ..inference import infer
        inputs = self._inputs(prompts, images)
        if any(images):
            while self.warmup > 0:
                self.warmup -= 1
                infer(self._model, inputs, method=None, **{**options, "max_new_tokens": 2})
            reports = infer(self._model, inputs, method=None, processor=None, **options)
            return [dict(answer_ids=r.answer_ids, prompt_tokens=r.prompt_tokens,
                         visual_tokens_per_layer=r.visual_tokens_per_layer, kv_bytes=r.kv_bytes,
                         kv_bytes_per_layer=r.kv_bytes_per_layer, prefill_flops=r.prefill_flops,
                         prefill_ms=r.prefill_ms, decode_ms_per_token=r.decode_ms_per_token,
                         batch_size=r.batch_size, reduction_layer=r.extra.get("layer"), units=r.units)
                    for r in reports]
        return self._run_text_batch(inputs, options)

    @torch.no_grad()
    def _run_text_batch(self, inputs: dict, options: dict) -> list[dict]:
        """A batch without images (infer needs one): the same timed loop, no visual tokens."""
        from ..cost import request_cost
        from ..inference import _eos_ids, generate_timed
        ids = inputs["input_ids"].to(self._device)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(self._device)
        new_ids, cache, prefill_s, decode_s, steps = generate_timed(self._model, ids, None, mask, **options)
        eos = _eos_ids(self._model, None)
        layers = len(cache.layers)
        bytes_per = torch.finfo(self._model.dtype).bits // 8
        out = []
        for b in range(ids.shape[0]):
            answer = new_ids[b].tolist()
            stop = [i for i, t in enumerate(answer) if t in eos]
            answer = answer[: stop[0]] if stop else answer
            text = int(mask[b].sum())
            cost = request_cost(self._model.config, text, [], layers - 1, bytes_per_element=bytes_per,
                                new_tokens=len(answer))
            out.append(dict(answer_ids=answer, prompt_tokens=text, visual_tokens_per_layer=[0] * layers,
                            kv_bytes=cost.kv_bytes, kv_bytes_per_layer=cost.kv_bytes_per_layer,
                            prefill_flops=cost.flops, prefill_ms=prefill_s * 1e3,
                            decode_ms_per_token=decode_s * 1e3 / max(steps, 1), batch_size=int(ids.shape[0]),
                            reduction_layer=None, units=[]))
        return out

    def _record(self, result: dict, task: str, doc_id: int) -> None:
        from lmms_eval.models.model_utils.gen_metrics import log_metrics
        vis = result["visual_tokens_per_layer"]
        record = dict(task=task, doc_id=doc_id, method=self.method, keep=self.keep,
                      new_tokens=len(result["answer_ids"]),
                      **{k: v for k, v in result.items() if k != "answer_ids"})
        self.records.append(record)
        # The request's share of its batch's wall time (so summed latencies equal the run's).
        share_s = (result["prefill_ms"] + result["decode_ms_per_token"] * max(len(result["answer_ids"]) - 1, 0)) \
            / 1e3 / result["batch_size"]
        numeric = dict(total_requests=1, visual_tokens=vis[0] if vis else 0, visual_tokens_kept=vis[-1] if vis else 0,
                       kv_bytes=result["kv_bytes"], prefill_flops=result["prefill_flops"],
                       prefill_ms=result["prefill_ms"], decode_ms_per_token=result["decode_ms_per_token"],
                       prompt_tokens=result["prompt_tokens"])
        if result["reduction_layer"] is not None:
            numeric["reduction_layer"] = result["reduction_layer"]
        numeric.update({f"visual_tokens_layer_{i}": n for i, n in enumerate(vis)})
        n_new = len(result["answer_ids"])
        payload = dict(total_elapsed_time=share_s, total_gen_tokens=n_new,
                       avg_speed=n_new / share_s if share_s > 0 else 0.0, additional_metrics=numeric)
        self.throughput.append(payload)
        log_metrics(**payload)

    def generate_until(self, requests) -> list:
        results = []

        def by_length(args):        # longest first: the first batch shows the memory peak
            return -len(self._tokenizer.encode(args[0])), args[0]

        order = lmms_utils.Collator([r.args for r in requests], by_length, grouping=True)
        bar = tqdm(total=len(requests), disable=self.rank != 0, desc="epic_ext responding")
        for chunk in order.get_batched(n=self.batch_size, batch_fn=None):
            contexts, gen_kwargs, doc_to_visual, doc_ids, tasks, splits = zip(*chunk)
            options, until = self._gen_options(gen_kwargs[0])
            images = [self._visuals(f, t, s, d) for f, t, s, d in zip(doc_to_visual, tasks, splits, doc_ids)]
            prompts = [self._prompt(c, len(im)) for c, im in zip(contexts, images)]
            for i, result in enumerate(self._run_batch(prompts, images, options)):
                text = self._tokenizer.decode(result["answer_ids"], skip_special_tokens=True)
                for stop in until:
                    text = text.split(stop)[0]
                self._record(result, tasks[i], doc_ids[i])
                results.append(GenerationResult(text=text, token_counts=TokenCounts(
                    input_tokens=result["prompt_tokens"], output_tokens=len(result["answer_ids"]))))
                self.cache_hook.add_partial("generate_until", (contexts[i], gen_kwargs[i]), text)
                bar.update(1)
        bar.close()
        return order.get_original(results)

    @torch.no_grad()
    def loglikelihood(self, requests) -> list:
        """log P(continuation | context, images) under the reduced model, one request at a time
        (continuation tokens appended to the prompt's; text is never dropped, so they are the
        last positions of the reduced sequence)."""
        out = []
        for request in tqdm(requests, disable=self.rank != 0, desc="epic_ext loglikelihood"):
            context, continuation, doc_to_visual, doc_id, task, split = request.args
            images = self._visuals(doc_to_visual, task, split, doc_id)
            inputs = self._inputs([self._prompt(context, len(images))], [images])
            cont = self._tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
            if cont.shape[1] == 0:
                raise ValueError(f"continuation: {continuation!r} has no tokens")
            ids = torch.cat([inputs["input_ids"], cont], dim=1).to(self._device)
            mask = torch.ones_like(ids)
            if "mm_token_type_ids" in inputs:       # Qwen-VL: the continuation is text (type 0)
                types = inputs["mm_token_type_ids"]
                inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, cont.shape[1])], dim=1)
            media = {k: (v.to(self._device, self._model.dtype) if v.is_floating_point() else v.to(self._device))
                     for k, v in inputs.items() if k not in ("input_ids", "attention_mask")
                     and isinstance(v, torch.Tensor)}
            logits = self._model(input_ids=ids, attention_mask=mask, use_cache=False, **media).logits
            n = cont.shape[1]
            logp = torch.log_softmax(logits[0, -n - 1:-1].float(), dim=-1)
            target = cont[0].to(self._device)
            total = float(logp.gather(-1, target[:, None]).sum())
            greedy = bool((logp.argmax(-1) == target).all())
            # lmms-eval 0.7.3's evaluator passes every response through unwrap_generation_output,
            # which turns a bare (float, bool) into its str(); a GenerationResult's text is handed
            # over as it is, so the pair travels in one (multiple-choice tasks then score).
            out.append(GenerationResult(text=(total, greedy), token_counts=TokenCounts(
                input_tokens=int(ids.shape[1]) - n, output_tokens=n)))
        return out

    def generate_until_multi_round(self, requests) -> list:
        raise NotImplementedError("epic_ext: multi-round generation is not supported yet")

    # ------------------------------------------------------------------ end of run
    def efficiency_summary(self, records: Optional[list] = None) -> dict:
        """Means over requests of the efficiency record (visual tokens per layer included)."""
        records = self.records if records is None else records
        if not records:
            return {}
        n = len(records)
        keys = ("prompt_tokens", "kv_bytes", "prefill_flops", "prefill_ms", "decode_ms_per_token", "new_tokens")
        summary = {"requests": n, "method": self.method, "keep": self.keep, "options": self.method_options}
        summary.update({f"mean_{k}": sum(r[k] for r in records) / n for k in keys})
        depth = max(len(r["visual_tokens_per_layer"]) for r in records)
        summary["mean_visual_tokens_per_layer"] = [
            sum(r["visual_tokens_per_layer"][i] for r in records if i < len(r["visual_tokens_per_layer"])) / n
            for i in range(depth)]
        return summary

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
