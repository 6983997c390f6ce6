"""benchmarks.report merges the per-op result files and names the model-level ones (prefill,
train step), whose rows have their own shape, instead of failing on them."""
import json

from benchmarks import report


def test_report_lists_model_level_files_and_tables_the_op_rows(tmp_path, capsys):
    machine = {"slug": "m", "name": "test machine"}
    op_row = {"case": "B=1 N=8", "provider": "eager", "median_ms": 1.0, "min_ms": 0.9, "speedup": 1.0,
              "gbps": 2.0}
    (tmp_path / "compress_m.json").write_text(json.dumps({"bench": "compress", "machine": machine,
                                                          "rows": [op_row]}))
    (tmp_path / "prefill_m.json").write_text(json.dumps({"bench": "prefill", "machine": machine,
                                                         "rows": [{"preset": "tiny", "keep": 64}]}))
    assert report.main(["--machine", "m", "--out-dir", str(tmp_path), "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "prefill: model-level rows" in out
    assert "B=1 N=8" in out
    # Only model-level files: listed, no table, no failure.
    (tmp_path / "compress_m.json").unlink()
    assert report.main(["--machine", "m", "--out-dir", str(tmp_path), "--no-plot"]) == 0
    assert "prefill: model-level rows" in capsys.readouterr().out
