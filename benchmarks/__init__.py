"""epic-ext microbenchmarks.

Every kernel is measured against the eager PyTorch composition the reference repositories use,
`torch.compile` of that composition, and the bandwidth of a plain copy of the same number of bytes
measured in the same run (DESIGN.md section 5).

    python -m benchmarks [--quick] [--only compress,iqr] [--shapes ...] [--providers ...]
    python -m benchmarks.bench_compress --quick
    python -m benchmarks.report

Each `bench_<name>.py` module defines `main(argv) -> int`; `python -m benchmarks` discovers them, so
a new kernel's benchmark plugs in by adding its module. Results go to
`benchmarks/results/<name>_<machine-slug>.json`; `report.py` merges them and draws a plot.
"""
