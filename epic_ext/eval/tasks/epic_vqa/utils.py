"""Document hooks of the synthetic VQA task (loaded by lmms-eval from the YAML's folder)."""
from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # One word, as the synthetic task's answers are.
    return f"{doc['question']}\nAnswer with one word."
