"""Manual check of the VLMEvalKit shim against a real VLMEvalKit source checkout (not collected by
pytest; the CI runs tests/eval/test_vlmeval.py against the stand-in instead):

    python tests/eval/vlmeval_real_check.py /path/to/VLMEvalKit [--stub-missing [--stub MODULE ...]]

Needs torch, transformers, pandas and the checkout's requirements (``pip install -e VLMEvalKit``).
``--stub-missing`` replaces the modules that VLMEvalKit's files import but this environment lacks
(API clients, metric packages of unrelated datasets) by empty stand-ins, so that the check runs in
an environment without VLMEvalKit's full requirements; the code paths checked here do not use them.
``--stub MODULE`` stubs an installed module too (one whose own dependencies are missing).

Checks: build_dataset reads write_vlmeval_task's TSV as a custom MCQ dataset; BaseModel.generate
of a registered EpicExtVLM answers as ReducedModel.generate; the vlmeval harness runs a two-cell
grid through run_grid (VLMEvalKit's own evaluate, scores flattened); the launcher runs the
checkout's run.py main() on the registered model.
"""
import importlib.abc
import importlib.machinery
import os
import sys
import tempfile
import types
from pathlib import Path
from unittest import mock


class _Stub(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = mock.MagicMock(name=f"{self.__name__}.{name}")
        setattr(self, name, value)
        return value


class _StubMissing(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Empty modules for third-party imports made by the checkout's files that nothing else provides."""

    def __init__(self, checkout: str, force=()) -> None:
        self.checkout = checkout
        self.force = set(force)
        self.stubbed = set()

    def find_spec(self, name, path, target=None):
        top = name.split(".")[0]
        if top in self.force:
            self.stubbed.add(name)
            return importlib.machinery.ModuleSpec(name, self, is_package=True)
        if top.startswith("_") or top in sys.stdlib_module_names or top in ("vlmeval", "epic_ext"):
            return None
        frame = sys._getframe(1)
        while frame is not None and ("importlib" in frame.f_code.co_filename
                                     or frame.f_code.co_filename.startswith("<")):
            frame = frame.f_back
        if frame is None or not frame.f_code.co_filename.startswith(self.checkout):
            return None
        for finder in sys.meta_path:
            if finder is not self:
                try:
                    if finder.find_spec(name, path, target) is not None:
                        return None
                except Exception:
                    pass
        self.stubbed.add(name)
        return importlib.machinery.ModuleSpec(name, self, is_package=True)

    def create_module(self, spec):
        module = _Stub(spec.name)
        module.__path__ = []
        return module

    def exec_module(self, module):
        if module.__name__ == "validators":          # vlmeval.smp.load asks whether a path is a URL
            module.url = lambda s, **k: False
        if module.__name__ == "num2words":           # used at import time by a dataset module
            module.num2words = lambda n, **k: f"n{n}"


def main() -> None:
    checkout = os.path.abspath(sys.argv[1])
    sys.path.insert(0, checkout)
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    if "--stub-missing" in sys.argv:
        force = [sys.argv[i + 1] for i, a in enumerate(sys.argv) if a == "--stub"]
        finder = _StubMissing(checkout, force)
        sys.meta_path.insert(0, finder)
    os.environ.setdefault("PRED_FORMAT", "tsv")
    import torch
    from PIL import Image
    torch.set_num_threads(1)
    from epic_ext.eval.grid import GridSpec, run_grid
    from epic_ext.eval.runner import ReducedModel
    from epic_ext.models import tiny
    from epic_ext.models.tiny_qwen import save_tiny_qwen

    root = Path(tempfile.mkdtemp(prefix="vlmeval_real_check_"))
    tiny.save_tiny_llava(root / "llava")
    save_tiny_qwen("qwen2_5_vl", root / "qwen2_5_vl")

    import epic_ext.eval.vlmeval as shim
    import vlmeval
    from vlmeval.config import supported_VLM
    from vlmeval.dataset import build_dataset
    assert vlmeval.__file__.startswith(checkout), vlmeval.__file__
    data = root / "LMUData"
    data.mkdir()
    shim.write_vlmeval_task(data, n=6)
    os.environ["LMUData"] = str(data)
    dataset = build_dataset("epic_vqa")
    assert type(dataset).__name__ == "CustomMCQDataset" and len(dataset) == 6 and dataset.meta_only
    message = dataset.build_prompt(dataset.data.iloc[0])

    name = shim.register_vlmeval("epic_ext_dart8", model_path=root / "qwen2_5_vl", method="dart", keep=8, layer=2,
                                 device="cpu", max_new_tokens=4)
    answer = supported_VLM[name]().generate(message, dataset="epic_vqa")
    runner = ReducedModel(str(root / "qwen2_5_vl"), method="dart", keep=8, layer=2, device="cpu")
    text = "\n".join(x["value"] for x in message if x["type"] == "text")
    with Image.open(message[0]["value"]) as im:
        assert answer == runner.generate([text], [[im.convert("RGB")]], max_new_tokens=4)[0]

    spec = GridSpec(model=str(root / "llava"), methods=("fastv",), keeps=(0.25,), tasks=("epic_vqa",),
                    harness="vlmeval", include_path=str(data), batch_size=4, limit=5, device="cpu",
                    max_new_tokens=4, layer=2)
    report = run_grid(spec, root / "grid", harness=shim.VLMEvalHarness(spec, work_dir=root / "work"),
                      progress=False, log=print)
    for cell in report["cells"]:
        assert "Overall" in cell["scores"]["epic_vqa"] and cell["samples"]["epic_vqa"] == 5, cell

    saved_argv = sys.argv
    sys.argv = [saved_argv[0]]
    shim.main(["--model-path", str(root / "llava"), "--method", "fastv", "--keep", "0.25", "--layer", "2",
               "--option", "device=cpu", "--option", "max_new_tokens=4", "--vlmeval-root", checkout,
               "--", "--data", "epic_vqa", "--work-dir", str(root / "runpy"), "--judge", "exact_matching"])
    sys.argv = saved_argv
    scores = list((root / "runpy" / "epic_ext_fastv0.25").glob("*/epic_ext_fastv0.25_epic_vqa_acc.*"))
    assert scores, sorted(map(str, (root / "runpy").rglob("*")))
    print(f"ok: {root}" + (f"; stubbed {sorted(finder.stubbed)}" if "--stub-missing" in sys.argv else ""))


if __name__ == "__main__":
    main()
