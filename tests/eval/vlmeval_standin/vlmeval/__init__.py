"""A minimal stand-in of VLMEvalKit (``vlmeval``) for epic-ext's shim tests (VLMEvalKit is not on
PyPI). It mirrors the names and signatures of open-compass/VLMEvalKit at commit e8e78f05
(2026-08-18) that ``epic_ext.eval.vlmeval`` uses: ``config.supported_VLM``, ``vlm.base.BaseModel``,
``dataset.build_dataset`` (a name, else ``<LMUData>/<name>.tsv`` as a custom MCQ / VQA dataset),
``dataset.build_prompt`` / ``evaluate``, and ``smp`` (``LMUDataRoot``, ``load``, ``dump``,
``get_pred_file_path``). Written from reading that source, reduced to what the tests need; tables
are :class:`vlmeval._frame.Frame` (the subset of a pandas DataFrame the shim touches), since the
project's environment has no pandas."""
__version__ = "0.2rc1-standin"


def load_env():
    """VLMEvalKit reads API keys from its checkout's .env here; the stand-in has none."""
