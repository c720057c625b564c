"""A pytest plugin for tools/gpu_verify.sh: one JSON line per test result, flushed as it comes.

    FREEU_VERIFY_PYTEST_JSONL=out.jsonl FREEU_VERIFY_PYTEST_PASS=cuda PYTHONPATH=tools python -m pytest -p pytest_jsonl ...

A run cut short by its time limit still leaves every finished test on disk (junit XML is written only at
the end). Lines: ``kind: "test"`` (nodeid, outcome, duration, pass label, the failure's last 1500
characters) and a closing ``kind: "session"`` (exit status, counts). Under pytest-xdist only the
controller writes (workers' reports reach it through the same hook).
"""

from __future__ import annotations

import json
import os
import time

_PATH_ENV = "FREEU_VERIFY_PYTEST_JSONL"
_PASS_ENV = "FREEU_VERIFY_PYTEST_PASS"
_state = {"file": None, "counts": {}, "started": None}


def _write(record) -> None:
    handle = _state["file"]
    if handle is not None:
        handle.write(json.dumps(record, default=str) + "\n")
        handle.flush()


def pytest_configure(config) -> None:
    """Opens the output file (controller process only)."""
    path = os.environ.get(_PATH_ENV)
    if path and not hasattr(config, "workerinput"):
        _state["file"] = open(path, "a", encoding="utf-8")
        _state["started"] = time.time()


def pytest_runtest_logreport(report) -> None:
    """One line per test: the call phase, or the setup/teardown phase where that is what failed or skipped."""
    if report.when != "call" and report.outcome == "passed":
        return
    outcome = report.outcome if report.when == "call" else f"{report.outcome} in {report.when}"
    if report.when == "setup" and report.outcome == "skipped":
        outcome = "skipped"
    _state["counts"][outcome] = _state["counts"].get(outcome, 0) + 1
    record = dict(kind="test", nodeid=report.nodeid, outcome=outcome, duration=round(report.duration, 3),
                  label=os.environ.get(_PASS_ENV))
    if report.outcome == "failed":
        record["longrepr"] = str(report.longrepr)[-1500:]
    elif report.outcome == "skipped" and isinstance(report.longrepr, tuple):
        record["reason"] = str(report.longrepr[-1])[:300]
    _write(record)


def pytest_sessionfinish(session, exitstatus) -> None:
    """The closing line: exit status and counts."""
    if _state["file"] is None:
        return
    _write(dict(kind="session", label=os.environ.get(_PASS_ENV), exitstatus=int(exitstatus),
                counts=_state["counts"], seconds=round(time.time() - _state["started"], 1)))
    _state["file"].close()
    _state["file"] = None
