"""The model side of every evaluation harness: a local checkpoint with a token-reduction method,
answering batches of (question, images) and measuring each request.

lmms-eval's ``epic_ext`` model (:mod:`.lmms`), the VLMEvalKit model (:mod:`.vlmeval`), the
built-in local harness (:mod:`.local`, the demo's) and the ``epic-ext eval`` grid (:mod:`.grid`)
all hold one :class:`ReducedModel`: the prompt format, preprocessing, batching, timing and the
efficiency record are written once here, so a score from one harness is comparable with another's.

Generation runs through :func:`epic_ext.infer` (prefill and decode timed apart; per request the
visual tokens per layer, KV bytes and prefill FLOPs of :func:`epic_ext.cost.request_cost`). The
method is applied once (:meth:`ReducedModel.set_method`) and every batch then runs with it; a grid
swaps methods on the one loaded model.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..models.loading import QWEN_VL_TYPES, check_model_type, load_model, load_processor

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# The efficiency record's numeric fields averaged per cell / run (visual tokens per layer apart).
MEAN_KEYS = ("prompt_tokens", "kv_bytes", "prefill_flops", "prefill_ms", "decode_ms_per_token", "new_tokens")


def keep_value(keep):
    """A budget as harness arguments give it (ints, floats, strings, None): a count, a ratio,
    a method's own string option, or None."""
    if keep is None or isinstance(keep, (int, float)) and not isinstance(keep, bool):
        return keep
    if isinstance(keep, str):
        return None if keep.lower() == "none" else keep
    raise TypeError(f"keep: expected a count, a ratio or None, got {keep!r}")


def generation_options(gen_kwargs: Optional[dict], default_max_new_tokens: int) -> tuple[dict, list]:
    """A task's generation kwargs (lmms-eval's ``generation_kwargs``) as :meth:`ReducedModel.generate`
    arguments and the ``until`` strings: temperature 0 (or none) is greedy, as lmms-eval's built-in
    models read it; ``max_new_tokens`` falls back to ``default_max_new_tokens``."""
    gen_kwargs = dict(gen_kwargs or {})
    until = gen_kwargs.pop("until", None) or []
    if isinstance(until, str):
        until = [until]
    if not isinstance(until, (list, tuple)):
        raise ValueError(f"gen_kwargs: 'until' must be a string or a list, got {type(until).__name__}")
    temperature = float(gen_kwargs.get("temperature") or 0.0)
    do_sample = bool(gen_kwargs.get("do_sample", False)) or temperature > 0
    options = dict(max_new_tokens=int(gen_kwargs.get("max_new_tokens") or default_max_new_tokens),
                   do_sample=do_sample, temperature=temperature if do_sample else 1.0, top_k=gen_kwargs.get("top_k"))
    return options, [u for u in until if u]


def efficiency_summary(records: list) -> dict:
    """Means over requests of the efficiency record (visual tokens per layer included); {} for
    no records."""
    if not records:
        return {}
    n = len(records)
    summary = {"requests": n}
    summary.update({f"mean_{k}": sum(r[k] for r in records) / n for k in MEAN_KEYS})
    depth = max(len(r["visual_tokens_per_layer"]) for r in records)
    summary["mean_visual_tokens_per_layer"] = [
        sum(r["visual_tokens_per_layer"][i] for r in records if i < len(r["visual_tokens_per_layer"])) / n
        for i in range(depth)]
    per_layer = summary["mean_visual_tokens_per_layer"]
    summary["mean_visual_tokens"] = per_layer[0] if per_layer else 0.0          # before any drop
    summary["mean_visual_tokens_kept"] = per_layer[-1] if per_layer else 0.0    # after it
    return summary


class ReducedModel:
    """``pretrained``: a local checkpoint folder (model + processor) of a family epic-ext supports.
    ``method`` / ``keep`` / ``method_options``: :func:`epic_ext.apply`'s. ``device`` (default: the
    GPU when there is one), ``dtype`` (a name in :data:`DTYPES`; default float32 on a CPU, bfloat16
    on a GPU), ``min_pixels`` / ``max_pixels`` (Qwen-VL's resize bounds), ``warmup`` (untimed
    batches before the first timed one; default 1 on a GPU, 0 on a CPU).

    :attr:`records` collects one efficiency record per answered request (cleared by
    :meth:`set_method` and :meth:`reset_records`)."""

    def __init__(self, pretrained, *, method: str = "none", keep=None, device=None, dtype: Optional[str] = None,
                 attn_implementation: str = "sdpa", min_pixels: Optional[int] = None,
                 max_pixels: Optional[int] = None, warmup: Optional[int] = None, **method_options) -> None:
        from ..inference import default_warmup

        if not isinstance(pretrained, (str, bytes)) and not hasattr(pretrained, "__fspath__") or not pretrained:
            raise ValueError(f"pretrained: a local checkpoint folder, got {pretrained!r}")
        self.pretrained = str(pretrained)
        self.model_type = check_model_type(self.pretrained)
        if dtype is not None and dtype not in DTYPES:
            raise ValueError(f"dtype: one of {', '.join(DTYPES)}, got {dtype!r}")
        if warmup is not None and (not isinstance(warmup, int) or isinstance(warmup, bool) or warmup < 0):
            raise ValueError(f"warmup: an integer >= 0, got {warmup!r}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            self.device = torch.device(device)
        except RuntimeError as e:
            raise ValueError(f"device: {e}") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} but no CUDA device is visible")
        self.processor = load_processor(self.pretrained)
        self.tokenizer = self.processor.tokenizer
        self.tokenizer.padding_side = "left"
        if min_pixels is not None or max_pixels is not None:
            self._set_pixel_range(min_pixels, max_pixels)
        self.model = load_model(self.pretrained, dtype=None if dtype is None else DTYPES[dtype],
                                attn_implementation=attn_implementation, device=self.device)
        self.warmup = default_warmup(self.device) if warmup is None else warmup
        self.records: list[dict] = []
        self.set_method(method, keep, **method_options)

    # ------------------------------------------------------------------ method
    def set_method(self, method: str = "none", keep=None, **options) -> None:
        """Apply ``method`` (bad options raise now, naming them); clears :attr:`records`."""
        from ..models import apply
        if not isinstance(method, str):
            raise TypeError(f"method: a method name, got {method!r}")
        keep = keep_value(keep)
        apply(self.model, method.lower(), keep=keep, **options)
        self.method, self.keep, self.method_options = method.lower(), keep, dict(options)
        self.reset_records()

    def reset_records(self) -> None:
        self.records = []

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
    def prompt(self, context: str, visuals) -> str:
        """One user turn: the visuals (a list of PIL images and :class:`~epic_ext.eval.video.Video`
        clips, in order; or a count of images), then the question (harness contexts may carry
        their own ``<image>`` tags; they are dropped, as lmms-eval's built-in models do)."""
        from .video import Video
        kinds = ["image"] * visuals if isinstance(visuals, int) else [
            "video" if isinstance(v, Video) else "image" for v in visuals]
        context = context.replace("<image>", "").strip()
        if self.model_type in QWEN_VL_TYPES:
            content = [{"type": k} for k in kinds] + [{"type": "text", "text": context}]
            return self.processor.apply_chat_template([{"role": "user", "content": content}], tokenize=False,
                                                      add_generation_prompt=True)
        if "video" in kinds:
            raise ValueError(f"visuals: a video for a {self.model_type} model, which takes images only "
                             "(videos: Qwen2-VL, Qwen2.5-VL, Qwen3-VL)")
        # LLaVA-1.5's conversation format (as `epic-ext infer` and the trainer's prompts).
        tag = getattr(self.processor, "image_token", "<image>")
        return "USER: " + f"{tag}\n" * len(kinds) + f"{context} ASSISTANT:"

    def inputs(self, prompts: list, visuals: list) -> dict:
        """The processor's batch: ``visuals[i]`` (images and videos) for ``prompts[i]``. Video frames
        go in as they were sampled (no resampling here), at the clip's sampled rate."""
        from .video import Video
        images = [v.convert("RGB") for row in visuals for v in row if not isinstance(v, Video)]
        videos = [v for row in visuals for v in row if isinstance(v, Video)]
        kwargs = {}
        if videos:
            from transformers.video_utils import VideoMetadata
            kwargs = dict(videos=[v.frames for v in videos], do_sample_frames=False,
                          video_metadata=[VideoMetadata(total_num_frames=len(v.frames), fps=v.fps,
                                                        frames_indices=list(range(len(v.frames))))
                                          for v in videos])
        return dict(self.processor(text=prompts, images=images or None, padding=True, return_tensors="pt", **kwargs))

    # ------------------------------------------------------------------ generation
    def generate(self, contexts: list, images: list, *, max_new_tokens: int = 32, do_sample: bool = False,
                 temperature: float = 1.0, top_k: Optional[int] = None, until=(), meta=None) -> list[str]:
        """Answer a batch: ``contexts[i]`` (a question) about ``images[i]`` (a list of PIL images and
        :class:`~epic_ext.eval.video.Video` clips, possibly empty). Returns the answers (cut at the first string of ``until``) and appends
        one efficiency record per request to :attr:`records` (``meta[i]``, a dict, is merged in)."""
        if len(contexts) != len(images):
            raise ValueError(f"images: {len(images)} lists for {len(contexts)} contexts")
        options = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k)
        prompts = [self.prompt(c, im) for c, im in zip(contexts, images)]
        answers = []
        for i, result in enumerate(self._run_batch(prompts, images, options)):
            text = self.tokenizer.decode(result["answer_ids"], skip_special_tokens=True)
            for stop in until:
                text = text.split(stop)[0]
            answers.append(text)
            record = dict(method=self.method, keep=self.keep, new_tokens=len(result["answer_ids"]),
                          **(meta[i] if meta is not None else {}),
                          **{k: v for k, v in result.items() if k != "answer_ids"})
            self.records.append(record)
        return answers

    def _run_batch(self, prompts: list, images: list, options: dict) -> list[dict]:
        """Per request: its answer ids and its efficiency record."""
        from ..inference import infer
        inputs = self.inputs(prompts, images)
        if any(images):
            while self.warmup > 0:
                self.warmup -= 1
                infer(self.model, inputs, method=None, **{**options, "max_new_tokens": 2})
            reports = infer(self.model, inputs, method=None, processor=None, **options)
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
        from ..inference import _eos_ids, answer_ids, generate_timed
        ids = inputs["input_ids"].to(self.device)
        mask = inputs.get("attention_mask")
        mask = torch.ones_like(ids) if mask is None else mask.to(self.device)
        new_ids, cache, prefill_s, decode_s, steps = generate_timed(self.model, ids, None, mask, **options)
        eos = _eos_ids(self.model, None)
        layers = len(cache.layers)
        bytes_per = torch.finfo(self.model.dtype).bits // 8
        out = []
        for b in range(ids.shape[0]):
            answer = answer_ids(new_ids[b], eos)
            text = int(mask[b].sum())
            cost = request_cost(self.model.config, text, [], layers - 1, bytes_per_element=bytes_per,
                                new_tokens=len(answer))
            out.append(dict(answer_ids=answer, prompt_tokens=text, visual_tokens_per_layer=[0] * layers,
                            kv_bytes=cost.kv_bytes, kv_bytes_per_layer=cost.kv_bytes_per_layer,
                            prefill_flops=cost.flops, prefill_ms=prefill_s * 1e3,
                            decode_ms_per_token=decode_s * 1e3 / max(steps, 1), batch_size=int(ids.shape[0]),
                            reduction_layer=None, units=[]))
        return out

    @torch.no_grad()
    def loglikelihood(self, context: str, continuation: str, images: list) -> tuple[float, bool, int, int]:
        """log P(continuation | context, images) under the reduced model, and whether greedy
        decoding would produce it; also the prompt's and the continuation's token counts. The
        continuation's tokens are appended to the prompt's; text is never dropped, so they are the
        last positions of the reduced sequence."""
        inputs = self.inputs([self.prompt(context, images)], [images])
        cont = self.tokenizer(continuation, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if cont.shape[1] == 0:
            raise ValueError(f"continuation: {continuation!r} has no tokens")
        ids = torch.cat([inputs["input_ids"], cont], dim=1).to(self.device)
        mask = torch.ones_like(ids)
        if "mm_token_type_ids" in inputs:       # Qwen-VL: the continuation is text (type 0)
            types = inputs["mm_token_type_ids"]
            inputs["mm_token_type_ids"] = torch.cat([types, types.new_zeros(1, cont.shape[1])], dim=1)
        media = {k: (v.to(self.device, self.model.dtype) if v.is_floating_point() else v.to(self.device))
                 for k, v in inputs.items() if k not in ("input_ids", "attention_mask")
                 and isinstance(v, torch.Tensor)}
        logits = self.model(input_ids=ids, attention_mask=mask, use_cache=False, **media).logits
        n = cont.shape[1]
        logp = torch.log_softmax(logits[0, -n - 1:-1].float(), dim=-1)
        target = cont[0].to(self.device)
        total = float(logp.gather(-1, target[:, None]).sum())
        greedy = bool((logp.argmax(-1) == target).all())
        return total, greedy, int(ids.shape[1]) - n, n

    # ------------------------------------------------------------------ summary
    def efficiency_summary(self, records: Optional[list] = None) -> dict:
        """:func:`efficiency_summary` of ``records`` (default: this model's), with the method."""
        records = self.records if records is None else records
        summary = efficiency_summary(records)
        if summary:
            summary = {"requests": summary.pop("requests"), "method": self.method, "keep": self.keep,
                       "options": self.method_options, **summary}
        return summary
