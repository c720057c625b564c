"""Codegen report: compile the GPU kernels without a GPU, count their SASS, model the fraction of copy bandwidth.

``python -m bench.codegen [--quick] [--out DIR]`` (see __main__.py). Layout: model.py (the data targets
return), sass.py (SASS parsing and counting), devices.py (the H100/H200 model), cases.py (the case list),
triton_target.py / cuda_target.py (compile one case for one architecture), report.py (rows, report.md,
results.json), budgets.py (the issue-10 budgets CI checks).
"""
