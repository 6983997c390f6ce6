"""``vlmeval.smp`` (a package upstream; file.py / misc.py): the data root, table files, the
prediction file's name, message file parsing."""
import csv
import json
import mimetypes
import os
import os.path as osp
import pickle

from ._frame import Frame


def load_env():
    pass


def LMUDataRoot():
    if "LMUData" in os.environ and osp.exists(os.environ["LMUData"]):
        return os.environ["LMUData"]
    root = osp.join(osp.expanduser("~"), "LMUData")
    os.makedirs(root, exist_ok=True)
    return root


def load(f, fmt=None):
    fmt = fmt or f.split(".")[-1]
    if fmt == "pkl":
        with open(f, "rb") as fh:
            return pickle.load(fh)
    if fmt == "json":
        with open(f, encoding="utf-8") as fh:
            data = json.load(fh)
        return Frame.from_records(data) if isinstance(data, list) and all(isinstance(x, dict) for x in data) else data
    if fmt == "tsv":          # pandas.read_csv(sep="\t"): empty cells are missing (None here, NaN there)
        with open(f, newline="", encoding="utf-8") as fh:
            rows = list(csv.reader(fh, delimiter="\t"))
        head, body = rows[0], rows[1:]
        return Frame({h: [(r[i] if r[i] != "" else None) for r in body] for i, h in enumerate(head)})
    raise NotImplementedError(f"stand-in load: {fmt}")


def dump(data, f, **kwargs):
    fmt = f.split(".")[-1]
    if fmt == "pkl":
        with open(f, "wb") as fh:
            pickle.dump(data, fh)
    elif fmt == "json":
        with open(f, "w", encoding="utf-8") as fh:
            json.dump(data.to_dict(orient="records") if isinstance(data, Frame) else data, fh, indent=1)
    elif fmt == "tsv":
        with open(f, "w", newline="", encoding="utf-8") as fh:
            writer = csv.writer(fh, delimiter="\t", quoting=csv.QUOTE_ALL)
            writer.writerow(data.columns)
            for row in data.to_dict(orient="records"):
                writer.writerow(["" if v is None else v for v in row.values()])
    else:
        raise NotImplementedError(f"stand-in dump: {fmt} (set PRED_FORMAT=tsv or json)")


def get_pred_file_format():
    fmt = os.getenv("PRED_FORMAT", "").lower()
    return fmt or "xlsx"


def get_pred_file_path(work_dir, model_name, dataset_name, use_env_format=True):
    fmt = get_pred_file_format() if use_env_format else "xlsx"
    return osp.join(work_dir, f"{model_name}_{dataset_name}.{fmt}")


def parse_file(s):
    if osp.exists(s) and s != ".":
        return mimetypes.types_map.get(osp.splitext(s)[1].lower(), "unknown"), s
    return None, s


def toliststr(s):
    if isinstance(s, str) and len(s) > 1 and s[0] == "[" and s[-1] == "]":
        return [str(x) for x in json.loads(s.replace("'", '"'))]
    if isinstance(s, str):
        return [s]
    return [str(x) for x in s]


def listinstr(lst, s):
    return any(item in s for item in lst)
