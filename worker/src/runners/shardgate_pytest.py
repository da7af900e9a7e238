"""shardgate's pytest plugin: reports each test by its exact node id, as it happens.

The worker loads it with `-p shardgate_pytest` (through PYTEST_ADDOPTS, so a profile's own run
command loads it too) and reads the events it appends, one JSON object per line, to the file
named by SHARDGATE_PYTEST_EVENTS:

  {"e": "collected", "id": ...}                  each item, under --collect-only (and serving)
  {"e": "start", "id": ...}                      a test begins
  {"e": "report", "id": ..., "when": ..., ...}   each phase's report
  {"e": "finish", "id": ...}                     a test ended
  {"e": "collecterror", "id": ..., ...}          a module (or other collector) failed to collect
  {"e": "collectskip", "id": ..., "reason": ...} a module skipped itself (importorskip at import)

A report's "reason" is a skip's reason or an xfail's (pytest's `wasxfail`), with "xfail" set.

Node ids come from pytest itself, whatever the project's addopts (-q, -v, -ra), junit_family or
inheritance; the worker times each started test against the run's test timeout from these
events. Under pytest-xdist only the controller writes (it receives every worker's reports).

With --shardgate-serve, pytest stays up as a warm runner for one worker slot: it collects the
suite once, says {"e": "ready", "count": N}, then runs shards as the worker appends them to the
file named by SHARDGATE_PYTEST_COMMANDS, one JSON object a line ({"shard": K, "ids": [...]}),
ending each with {"e": "done", "shard": K}. A node id it did not collect, or one it already ran
(a retry gets a fresh pytest), is {"e": "skip", "id": ...}: the worker runs those the ordinary
way. It exits when its worker is gone or after a while with nothing to do.

A warm pytest never serves a session whose ending could turn red: where a plugin or conftest
other than pytest's own implements pytest_sessionfinish or wraps pytest_runtestloop (a coverage
threshold, a leak check), it says {"e": "nowarm", "message": ...} and exits, and the run's shards
go to a pytest each, whose exit status the worker reads.
"""

import json
import os
import time

import pytest

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
    if session.config.option.collectonly or session.config.getoption("shardgate_serve", False):
        for item in session.items:
            _emit({"e": "collected", "id": item.nodeid})
        # A module that skipped itself is a test of its own, skipped with its reason.
        for nodeid, event in _collect_events.items():
            if event["e"] == "collectskip":
                _emit({"e": "collected", "id": nodeid})


# The collectors that failed or skipped themselves, by node id: a warm pytest serving one of
# them as a test reports it again.
_collect_events = {}


def _skip_reason(report):
    """A skip's reason as pytest's summary prints it, without its "Skipped: " prefix."""
    longrepr = getattr(report, "longrepr", None)
    if isinstance(longrepr, tuple) and len(longrepr) == 3:
        text = str(longrepr[2])
    elif longrepr is None:
        text = ""
    else:
        text = getattr(getattr(longrepr, "reprcrash", None), "message", None) or str(longrepr)
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


def pytest_collectreport(report):
    if report.skipped and report.nodeid:
        event = {"e": "collectskip", "id": report.nodeid, "reason": _skip_reason(report)}
        _collect_events.setdefault(report.nodeid, event)
        _emit(event)
        return
    if not report.failed:
        return
    crash = getattr(getattr(report, "longrepr", None), "reprcrash", None)
    try:
        text = report.longreprtext
    except Exception:  # a plugin's own report type
        text = str(report.longrepr)
    message = getattr(crash, "message", "") or ""
    if not message:
        lines = [l for l in text.splitlines() if l.strip()]
        message = lines[-1] if lines else "collection failed"
    event = {"e": "collecterror", "id": report.nodeid, "message": message, "longrepr": text}
    _collect_events.setdefault(report.nodeid, event)
    _emit(event)


def _session_end_hooks(config):
    """The plugins and conftests besides pytest's own that could turn a session red at its end."""
    found = []
    pm = config.pluginmanager
    for name in ("pytest_sessionfinish", "pytest_runtestloop"):
        for impl in getattr(pm.hook, name).get_hookimpls():
            module = getattr(impl.function, "__module__", "") or ""
            if module.startswith("_pytest") or module == __name__:
                continue
            found.append("%s (%s)" % (name, module or impl.plugin_name))
    return found


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
    if hasattr(report, "wasxfail"):
        event["reason"] = str(report.wasxfail or "")
    elif report.skipped:
        event["reason"] = _skip_reason(report)
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


# How long a warm pytest waits for its next shard before it exits, and how often it looks.
_SERVE_IDLE_S = 120.0
_SERVE_POLL_S = 0.003


def pytest_addoption(parser):
    parser.addoption(
        "--shardgate-serve",
        action="store_true",
        default=False,
        help="shardgate: run shards appended to $SHARDGATE_PYTEST_COMMANDS in this session",
    )


def _commands(path, parent):
    """Yields each command appended to `path`, until the worker is gone or none comes."""
    offset = 0
    pending = b""
    idle_since = time.monotonic()
    while True:
        try:
            with open(path, "rb") as f:
                f.seek(offset)
                chunk = f.read()
        except OSError:
            chunk = b""
        offset += len(chunk)
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            if line.strip():
                yield json.loads(line)
        if lines:
            idle_since = time.monotonic()
        elif os.getppid() != parent or time.monotonic() - idle_since > _SERVE_IDLE_S:
            return
        else:
            time.sleep(_SERVE_POLL_S)


@pytest.hookimpl(tryfirst=True)
def pytest_runtestloop(session):
    if not session.config.getoption("shardgate_serve", False):
        return None
    foreign = _session_end_hooks(session.config)
    if foreign:
        _emit({"e": "nowarm", "message": "the session's end could fail it: " + ", ".join(foreign)})
        return True
    items = {item.nodeid: item for item in session.items}
    ran = set()
    _emit({"e": "ready", "count": len(items)})
    path = os.environ["SHARDGATE_PYTEST_COMMANDS"]
    for command in _commands(path, os.getppid()):
        todo = []
        for nodeid in command["ids"]:
            item = items.get(nodeid)
            collector = _collect_events.get(nodeid)
            if collector is not None and nodeid not in ran:
                ran.add(nodeid)
                _emit(collector)
            elif item is None or nodeid in ran:
                _emit({"e": "skip", "id": nodeid})
            else:
                ran.add(nodeid)
                todo.append(item)
        for i, item in enumerate(todo):
            nextitem = todo[i + 1] if i + 1 < len(todo) else None
            # A shard runs to its end whatever the project's -x or --maxfail say.
            item.config.hook.pytest_runtest_protocol(item=item, nextitem=nextitem)
        _emit({"e": "done", "shard": command["shard"]})
    return True
