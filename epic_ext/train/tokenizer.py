"""An offline word-level tokenizer for the synthetic task, sized to the tiny LLaVA configs.

Ids: ``<pad>`` 0, ``<s>`` 1, ``</s>`` 2, ``<unk>`` 3, then the task's closed vocabulary (every
word of :mod:`.synthetic`'s questions and answers, LLaVA's ``USER``/``ASSISTANT``, the words of
LLaVA-1.5's system prompt, digits and punctuation), then ``<unused_N>`` fillers, and ``<image>``
as the LAST id so that it equals the tiny config's ``image_token_id = vocab_size - 1`` and
``len(tokenizer) == vocab_size``. Text splits on whitespace and punctuation (``\\w+|[^\\w\\s]+``),
so words are one token each and an answer's tokens are exactly its words; decoding joins with
spaces and re-attaches punctuation (``"... square?"``), which round-trips questions and answers
(newlines are whitespace and do not survive).

Real checkpoints keep their own tokenizer (``AutoTokenizer.from_pretrained(path)``); the dataset
code works with both.
"""
from __future__ import annotations

import re

from .data import LLAVA_SYSTEM
from .synthetic import vocabulary

SPECIALS = ("<pad>", "<s>", "</s>", "<unk>")
IMAGE_TOKEN = "<image>"
PUNCTUATION = (".", ",", "?", "!", ":", ";", "'", "-", "(", ")")

# LLaVA-1.5 "v1" conversation (the same text as :func:`.data.format_conversation`, BOS in front):
# "USER: <image>\n{q} ASSISTANT: {a}</s>USER: {q2} ASSISTANT: {a2}</s>"; a generation prompt ends
# with "ASSISTANT:". Content may be a string or llava-hf style parts ({"type": "image"/"text"}).
CHAT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages -%}"
    "{%- if message['content'] is string -%}{%- set content = message['content'] -%}"
    "{%- else -%}{%- set ns = namespace(text='') -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'image' -%}{%- set ns.text = ns.text + '<image>\\n' -%}"
    "{%- elif part['type'] == 'text' -%}{%- set ns.text = ns.text + part['text'] -%}{%- endif -%}"
    "{%- endfor -%}{%- set content = ns.text -%}{%- endif -%}"
    "{%- if message['role'] == 'system' -%}{{- content + ' ' -}}"
    "{%- elif message['role'] == 'user' -%}{{- 'USER: ' + content + ' ' -}}"
    "{%- else -%}{{- 'ASSISTANT: ' + content + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'ASSISTANT:' -}}{%- endif -%}"
)


def task_words() -> list[str]:
    """The closed word list (specials and ``<image>`` excluded), in id order."""
    words = set(vocabulary()) | {"USER", "ASSISTANT"} | set(PUNCTUATION) | {str(d) for d in range(10)}
    words |= set(re.findall(r"\w+|[^\w\s]+", LLAVA_SYSTEM))
    return sorted(words)


def build_tokenizer(vocab_size: int = 1024, model_max_length: int = 2048):
    """A ``PreTrainedTokenizerFast`` (word level, offline) with exactly ``vocab_size`` ids,
    ``<image>`` = ``vocab_size - 1``, BOS added in front of every text, LLaVA-1.5's chat template.
    Raises ValueError when the vocabulary does not fit."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = task_words()
    needed = len(SPECIALS) + len(words) + 1
    if vocab_size < needed:
        raise ValueError(f"vocab_size: {vocab_size} is too small for the task's {needed} tokens "
                         f"({len(SPECIALS)} specials + {len(words)} words + {IMAGE_TOKEN})")
    vocab = {t: i for i, t in enumerate(list(SPECIALS) + words)}
    # Fillers keep ids contiguous so len(tokenizer) == vocab_size == the model's embedding rows.
    for i in range(len(vocab), vocab_size - 1):
        vocab[f"<unused_{i}>"] = i
    vocab[IMAGE_TOKEN] = vocab_size - 1

    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    # WordPiece's cleanup re-attaches punctuation ("square ?" -> "square?"); no word starts with "##".
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in (*SPECIALS, IMAGE_TOKEN)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B",
                                                       special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN}, chat_template=CHAT_TEMPLATE,
        model_max_length=model_max_length, padding_side="right", clean_up_tokenization_spaces=False,
        closed_vocabulary=True)   # kept in tokenizer_config.json: datasets check their words against it


def is_closed_vocabulary(tokenizer) -> bool:
    """Whether ``tokenizer`` is this module's word-level one (saved and reloaded included)."""
    return bool(getattr(tokenizer, "init_kwargs", {}).get("closed_vocabulary", False))


def unknown_words(tokenizer, texts) -> tuple[int, int, list[str]]:
    """(unknown tokens, all tokens, up to 5 distinct unknown words) of ``texts`` under
    ``tokenizer``: the words a closed vocabulary maps to ``<unk>``."""
    unk = tokenizer.unk_token_id
    texts = list(texts)
    if unk is None or not texts:
        return 0, 0, []
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True)
    n_unk = total = 0
    examples: list[str] = []
    for text, ids, offsets in zip(texts, enc["input_ids"], enc["offset_mapping"]):
        total += len(ids)
        for tid, (a, b) in zip(ids, offsets):
            if tid == unk:
                n_unk += 1
                if len(examples) < 5 and text[a:b] not in examples:
                    examples.append(text[a:b])
    return n_unk, total, examples
