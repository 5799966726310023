"""pytest policy for python/tests: a skip is a failure.

A skipped test proves nothing, and a suite that skips where PyTorch, transformers or the CLI binary
is missing passes on a machine that tested nothing. So every skip fails the run, with its reason
printed, except the reasons in _support.ALLOWED_SKIPS (the machine has no CUDA device: the CUDA
tests cannot run on CI's machines, and they say so).

- a skip inside a test (setup, call or teardown) becomes that test's failure;
- a skip of a whole module at import (`raise Skip(...)` at module level) cannot become a failure
  without stopping the collection of every other module, so it is listed at the end of the run
  and the run's exit status is set to "tests failed".

Run with `-rs` to see the allowed skips' reasons too (scripts/test-python.sh runs `-rfEs`).
"""

import pytest

from _support import ALLOWED_SKIPS

_RULE = f"(python/tests/conftest.py: a test may only skip for {', '.join(map(repr, ALLOWED_SKIPS))})"
_module_skips = []  # (module node id, reason) of forbidden module-level skips


def _reason(longrepr):
    """The reason of a skip report (its longrepr is (path, line, "Skipped: reason"))."""
    reason = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    # A module's `raise Skip(...)` at import reads "unittest.case.SkipTest: reason".
    for prefix in ("Skipped: ", "unittest.case.SkipTest: "):
        reason = reason.removeprefix(prefix)
    return reason


def _allowed(reason):
    return reason.startswith(ALLOWED_SKIPS)


def pytest_sessionstart(session):
    # The tests exercise the installed package (see _support.py); say so plainly if it is not.
    try:
        import svft  # noqa: F401
    except ImportError as e:
        pytest.exit(
            f"cannot import svft ({e}): python/tests test the installed package; "
            "run scripts/test-python.sh, or `pip install .` from the repository root first",
            returncode=pytest.ExitCode.USAGE_ERROR,
        )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item, call):
    report = yield
    if report.skipped and not hasattr(report, "wasxfail"):
        reason = _reason(report.longrepr)
        # `raise Skip(...)` (unittest.SkipTest) is reported at the line of pytest's own code that
        # translates it; point at the test instead, so `-rs` says which test skipped.
        report.longrepr = (str(item.path), item.location[1] + 1, f"Skipped: {item.name}: {reason}")
        if not _allowed(reason):
            report.outcome = "failed"
            report.longrepr = f"skipped, and skips are failures here: {reason}\n{_RULE}"
    return report


def pytest_collectreport(report):
    if report.skipped:
        reason = _reason(report.longrepr)
        if not _allowed(reason):
            _module_skips.append((report.nodeid, reason))


def pytest_terminal_summary(terminalreporter):
    if _module_skips:
        terminalreporter.section("modules skipped at import: skips are failures here", sep="=", red=True)
        for nodeid, reason in _module_skips:
            terminalreporter.line(f"FAILED {nodeid}: {reason}", red=True)
        terminalreporter.line(_RULE)


def pytest_sessionfinish(session, exitstatus):
    if _module_skips and exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
