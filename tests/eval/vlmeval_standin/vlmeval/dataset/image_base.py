"""``ImageBaseDataset``: ``data`` (a table with ``index`` and ``question``; images as ``image``
(base64) or ``image_path``; ``meta_only`` when only paths), ``build_prompt(line)`` -> the image
items then the question, ``dump_image(line)`` -> the image paths, ``evaluate(eval_file,
**judge_kwargs)``. The stand-in reads paths only (no base64 images)."""
import os.path as osp
from abc import abstractmethod

from ..smp import LMUDataRoot, load, toliststr


class ImageBaseDataset:
    MODALITY = "IMAGE"
    DATASET_URL = {}

    def __init__(self, dataset="MMBench", skip_noimg=True):
        self.dataset_name = dataset
        self.img_root = osp.join(LMUDataRoot(), "images", dataset)
        data = self.load_data(dataset)
        data["index"] = [str(x) for x in data["index"]]
        self.meta_only = "image" not in data
        if not self.meta_only:
            raise NotImplementedError("stand-in: base64 images")
        if "image_path" in data:
            paths = [toliststr(x) for x in data["image_path"]]
            data["image_path"] = [x[0] if len(x) == 1 else x for x in paths]
        if all(x.lstrip("-").isdigit() for x in data["index"]):
            data["index"] = [int(x) for x in data["index"]]
        self.data = data
        self.skip_noimg = skip_noimg

    def __len__(self):
        return len(self.data)

    @classmethod
    def supported_datasets(cls):
        return list(cls.DATASET_URL)

    def load_data(self, dataset):
        return load(osp.join(LMUDataRoot(), f"{dataset}.tsv"))

    def dump_image(self, line):
        return toliststr(line["image_path"])

    def build_prompt(self, line):
        if isinstance(line, int):
            line = self.data.iloc[line]
        paths = toliststr(line["image_path"]) if self.meta_only else self.dump_image(line)
        return [dict(type="image", value=p) for p in paths] + [dict(type="text", value=line["question"])]

    @abstractmethod
    def evaluate(self, eval_file, **judge_kwargs):
        pass
