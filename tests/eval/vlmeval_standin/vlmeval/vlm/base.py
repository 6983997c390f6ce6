"""``BaseModel``: ``generate(message, dataset)`` checks and normalises a message (a str, a dict,
a list of str (paths become images) or a list of {"type", "value"} dicts) and calls
``generate_inner``; ``allowed_types`` limits the item types; ``INTERLEAVE`` False: a model that
does not take images between texts (``message_to_promptimg``: the first image + the joined
texts)."""
from abc import abstractmethod

from ..smp import parse_file


class BaseModel:
    INTERLEAVE = False
    allowed_types = ["text", "image", "video"]

    def __init__(self):
        self.dump_image_func = None

    def use_custom_prompt(self, dataset):
        return False

    @abstractmethod
    def build_prompt(self, line, dataset):
        raise NotImplementedError

    def set_dump_image(self, dump_image_func):
        self.dump_image_func = dump_image_func

    def dump_image(self, line, dataset):
        return self.dump_image_func(line)

    @abstractmethod
    def generate_inner(self, message, dataset=None):
        raise NotImplementedError

    def check_content(self, msgs):
        if isinstance(msgs, str):
            return "str"
        if isinstance(msgs, dict):
            return "dict"
        if isinstance(msgs, list):
            kinds = {self.check_content(m) for m in msgs}
            if kinds == {"str"}:
                return "liststr"
            if kinds == {"dict"}:
                return "listdict"
        return "unknown"

    def preproc_content(self, inputs):
        kind = self.check_content(inputs)
        if kind == "str":
            return [dict(type="text", value=inputs)]
        if kind == "dict":
            assert "type" in inputs and "value" in inputs
            return [inputs]
        if kind == "liststr":
            out = []
            for s in inputs:
                mime, path = parse_file(s)
                out.append(dict(type="text", value=s) if mime in (None, "unknown")
                           else dict(type=mime.split("/")[0], value=path))
            return out
        if kind == "listdict":
            for item in inputs:
                assert "type" in item and "value" in item
                mime, path = parse_file(item["value"])
                if mime is None:
                    assert item["type"] == "text"
                else:
                    assert mime.split("/")[0] == item["type"]
                    item["value"] = path
            return inputs
        return None

    def generate(self, message, dataset=None):
        assert self.check_content(message) in ["str", "dict", "liststr", "listdict"], message
        message = self.preproc_content(message)
        assert message is not None and self.check_content(message) == "listdict"
        for item in message:
            assert item["type"] in self.allowed_types, f"Invalid input type: {item['type']}"
        return self.generate_inner(message, dataset)

    def message_to_promptimg(self, message, dataset=None):
        assert not self.INTERLEAVE
        prompt = "\n".join(x["value"] for x in message if x["type"] == "text")
        images = [x["value"] for x in message if x["type"] == "image"]
        return prompt, (images[0] if images else None)
