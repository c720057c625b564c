"""freeu_kernels' benchmark suite: op-level, low-rank/FFT crossover and U-Net-level timings, with reports.

Run ``python -m bench`` from the repository root (``--help`` for options; bench/README.md for the method).
From Python::

    from bench import SuiteConfig, run_suite, write_outputs
    result = run_suite(SuiteConfig(quick=True, out="bench/out"))  # out: results.jsonl as cases finish
    write_outputs(result, "bench/out")

A KeyboardInterrupt during the run raises SuiteInterrupted; its ``result`` holds the finished cases.
"""

from .suite import (OUTPUT_FILES, ROWS_LOG, SuiteConfig, SuiteInterrupted, SuiteResult, run_suite, summary_text,
                    write_outputs)

__all__ = ["OUTPUT_FILES", "ROWS_LOG", "SuiteConfig", "SuiteInterrupted", "SuiteResult", "run_suite", "summary_text",
           "write_outputs"]
