"""Document hooks of the synthetic VQA task (loaded by lmms-eval from the YAML's folder)."""
from PIL import Image


def doc_to_visual(doc):
    with Image.open(doc["image"]) as im:
        return [im.convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    # The question alone: the demo's models are trained on "USER: <image>\n{question} ASSISTANT:"
    # (epic_ext.train.data), the prompt the epic_ext model builds from it; an instruction suffix
    # would be text they never saw.
    return doc["question"]
