"""shardgate's pytest plugin: reports each test by its exact node id, as it happens.

The worker loads it with `-p shardgate_pytest` (through PYTEST_ADDOPTS, so a profile's own run
command loads it too) and reads the events it appends, one JSON object per line, to the file
named by SHARDGATE_PYTEST_EVENTS:

  {"e": "collected", "id": ...}                  each item, under --collect-only
  {"e": "start", "id": ...}                      a test begins
  {"e": "report", "id": ..., "when": ..., ...}   each phase's report
  {"e": "finish", "id": ...}                     a test ended

Node ids come from pytest itself, whatever the project's addopts (-q, -v, -ra), junit_family or
inheritance; the worker times each started test against the run's test timeout from these
events. Under pytest-xdist only the controller writes (it receives every worker's reports).
"""

import json
import os

_out = None
_enabled = True


def _emit(obj):
    global _out
    if not _enabled:
        return
    if _out is None:
        path = os.environ.get("SHARDGATE_PYTEST_EVENTS")
        if not path:
            return
        _out = open(path, "a", encoding="utf-8")
    _out.write(json.dumps(obj) + "\n")
    _out.flush()


def pytest_configure(config):
    global _enabled
    # An xdist worker's reports reach the controller, which writes them.
    _enabled = not hasattr(config, "workerinput")


def pytest_collection_finish(session):
    if session.config.option.collectonly:
        for item in session.items:
            _emit({"e": "collected", "id": item.nodeid})


def pytest_runtest_logstart(nodeid, location):
    _emit({"e": "start", "id": nodeid})


def pytest_runtest_logreport(report):
    event = {
        "e": "report",
        "id": report.nodeid,
        "when": report.when,
        "outcome": report.outcome,
        "duration": getattr(report, "duration", 0.0),
        "xfail": hasattr(report, "wasxfail"),
    }
    if report.failed or (report.skipped and report.when != "call"):
        crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
        event["message"] = getattr(crash, "message", "") or ""
        try:
            event["longrepr"] = report.longreprtext
        except Exception:  # a plugin's own report type
            event["longrepr"] = str(report.longrepr)
    if report.failed:
        event["sections"] = [[title, text] for title, text in report.sections]
    _emit(event)


def pytest_runtest_logfinish(nodeid, location):
    _emit({"e": "finish", "id": nodeid})
