"""``build_dataset(name)``: a dataset class that lists ``name``, else ``<LMUData>/<name>.tsv``: with
option columns A and B a custom MCQ dataset (scored by exact matching of the option without a
judge), else a custom VQA dataset (whose evaluate raises NotImplementedError upstream as here)."""
import os.path as osp
import string
import warnings

from ..smp import LMUDataRoot, load
from ._frame_report import report_acc
from .image_base import ImageBaseDataset


class CustomMCQDataset(ImageBaseDataset):
    TYPE = "MCQ"

    def build_prompt(self, line):
        if isinstance(line, int):
            line = self.data.iloc[line]
        paths = self.dump_image(line)
        options = {c: line[c] for c in string.ascii_uppercase if c in line and line[c] is not None}
        prompt = f"Question: {line['question']}\n"
        if options:
            prompt += "Options:\n" + "".join(f"{k}. {v}\n" for k, v in options.items())
            prompt += "Please select the correct answer from the options above. \n"
        return [dict(type="image", value=p) for p in paths] + [dict(type="text", value=prompt)]

    @staticmethod
    def _extract(prediction, options):
        """The option a prediction names: its leading letter ('B', 'B.', '(B)') or an option's text."""
        text = str(prediction).strip().lstrip("(")
        if text[:1] in options and (len(text) == 1 or not text[1].isalnum()):
            return text[0]
        hits = [k for k, v in options.items() if text.lower().rstrip(".") == str(v).lower()]
        return hits[0] if len(hits) == 1 else None

    def evaluate(self, eval_file, **judge_kwargs):
        judge_kwargs.pop("nproc", 4)
        if judge_kwargs.get("model", "exact_matching") != "exact_matching":
            raise NotImplementedError("stand-in: no judge model")
        data = load(eval_file)
        known = {str(x) for x in self.data["index"]}
        assert all(str(x) in known for x in data["index"]), "eval_file should be a subset of the dataset"
        hits = []
        for row in data.to_dict(orient="records"):
            options = {c: row[c] for c in string.ascii_uppercase if row.get(c) is not None}
            hits.append(float(self._extract(row["prediction"], options) == row["answer"]))
        data["hit"] = hits
        return report_acc(data)


class CustomVQADataset(ImageBaseDataset):
    TYPE = "VQA"

    def evaluate(self, eval_file, **judge_kwargs):
        raise NotImplementedError


class VideoStandInDataset(ImageBaseDataset):
    """A video dataset's type (the harness refuses video)."""
    MODALITY = "VIDEO"
    TYPE = "Video-MCQ"
    DATASET_URL = {"Video-StandIn": ""}

    def __init__(self, dataset="Video-StandIn", **kwargs):
        self.dataset_name = dataset


DATASET_CLASSES = [VideoStandInDataset]


def DATASET_TYPE(dataset, *, default="MCQ"):
    for cls in DATASET_CLASSES:
        if dataset in cls.supported_datasets():
            return cls.TYPE
    return default


def build_dataset(dataset_name, **kwargs):
    for cls in DATASET_CLASSES:
        if dataset_name in cls.supported_datasets():
            return cls(dataset=dataset_name, **kwargs)
    warnings.warn(f"Dataset {dataset_name} is not officially supported. ")
    data_file = osp.join(LMUDataRoot(), f"{dataset_name}.tsv")
    if not osp.exists(data_file):
        return None
    data = load(data_file)
    if "question" not in [c.lower() for c in data.columns]:
        return None
    if "A" in data and "B" in data:
        return CustomMCQDataset(dataset=dataset_name, **kwargs)
    return CustomVQADataset(dataset=dataset_name, **kwargs)
