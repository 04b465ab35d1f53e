"""The gate as a unit test: a pytest plugin (entry point `pytest11`, loaded whenever tagway is installed).

    def test_refunds(tagway_gate):
        tagway_gate(spec="replay.yaml", dataset="refunds@3")       # fails with the per-segment table

    @pytest.mark.tagway_gate(spec="replay.yaml", dataset="refunds@3")
    def test_refunds_marked():                                   # the same, as a marker
        pass

    @pytest.mark.tagway_gate(spec="replay.yaml", dataset="refunds@3")
    def test_refunds_segment(tagway_segment):                    # one test per segment: test_...[acme]
        pass

A gate is the replay of `tagway replay run --spec S --dataset D` (replay.pipeline.start_run: the run and its results
are stored as usual), once per (spec, dataset, overrides) per pytest process (per xdist worker), through the gateway
of `--gateway URL` (`--tagway-gateway`, the only name when the project's conftest has its own `--gateway`; env
TAGWAY_GATEWAY_URL) or, without one, the gateway app in-process (built from `--tagway-config` / TAGWAY_CONFIG). The
store: `--tagway-dsn` / TAGWAY_DSN / the config's, as the CLI resolves it. A test fails when the gate does not pass
(a regression, an incomplete run, inconclusive under `inconclusive: block`); a segment's test fails when its own row
does. Spec paths are relative to the test file, then the working directory. `-k` selects segments by id; `-x` stops
at the first failed one.
"""
from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from .gate import EXIT_PASS, INCONCLUSIVE, REGRESSION

__all__ = ["GateRunner", "GateFailed"]

MARK = "tagway_gate"


class GateFailed(AssertionError):
    """The gate did not pass; the message is the per-segment table."""


_GATEWAY_HELP = ("tagway gateway base URL for tagway_gate (env TAGWAY_GATEWAY_URL; default: the gateway serving "
                 "the config's store, else in-process).")


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("tagway", "tagway replay gates")
    group.addoption("--tagway-gateway", dest="tagway_gateway", default=None, help=_GATEWAY_HELP)
    group.addoption("--tagway-config", dest="tagway_config", default=None,
                    help="Gateway config: its store, and the in-process gateway (env TAGWAY_CONFIG).")
    group.addoption("--tagway-dsn", dest="tagway_dsn", default=None, help="ClickHouse DSN (env TAGWAY_DSN).")
    group.addoption("--tagway-api-key", dest="tagway_api_key", default=None,
                    help="Gateway key (env TAGWAY_API_KEY or TAGWAY_ADMIN_KEY).")


@pytest.hookimpl(hookwrapper=True)
def pytest_load_initial_conftests(early_config: pytest.Config, parser: pytest.Parser, args: list[str]) -> Any:
    """`--gateway` (the short name of --tagway-gateway) is added once the project's conftests have added their
    options, and only when none of them (nor another plugin) took the name: this plugin loads wherever tagway is
    installed, and a project whose conftest had its own `--gateway` could not run its tests at all (argparse's
    "conflicting option string: --gateway"). Such a project keeps its option; the gate's is --tagway-gateway."""
    yield
    # a conftest's parser.addoption lands in the anonymous group, which pytest 8 keeps out of _groups (9 does not)
    groups = [*getattr(parser, "_groups", ()), getattr(parser, "_anonymous", None)]
    taken = {name for group in groups if group is not None for opt in getattr(group, "options", ())
             for name in opt.names()}
    if "--gateway" not in taken:
        parser.getgroup("tagway").addoption("--gateway", dest="tagway_gateway", default=None, help=_GATEWAY_HELP)


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARK}(spec, dataset=None, **overrides): replay the dataset (or the spec's "
                            "slice) and fail unless the gate passes; with the tagway_segment fixture, one test per "
                            "segment")


class GateRunner:
    """Runs each distinct gate once per process and keeps its report."""

    def __init__(self, config: pytest.Config) -> None:
        opt = config.getoption
        self.gateway = opt("tagway_gateway") or os.environ.get("TAGWAY_GATEWAY_URL")
        cfg = opt("tagway_config") or os.environ.get("TAGWAY_CONFIG")
        self.config = Path(cfg) if cfg else None
        self.dsn = opt("tagway_dsn")
        self.api_key = opt("tagway_api_key") or os.environ.get("TAGWAY_API_KEY") or \
            os.environ.get("TAGWAY_ADMIN_KEY") or ""
        self.rootdir = Path(str(config.rootpath))
        self._reports: dict[tuple, Any] = {}
        self._store: Any = None

    @property
    def store(self) -> Any:
        if self._store is None:
            from exporters.dsn import resolve_dsn
            from exporters.schema import migrate
            from exporters.store_access import open_store

            from .runner import store_dsn_for
            # a gate may seed a new store; given only --tagway-gateway, the store that gateway records to
            self._store = open_store(store_dsn_for(resolve_dsn(self.dsn, self.config), self.gateway, self.api_key),
                                     create=True)
            migrate(self._store)
        return self._store

    def spec_path(self, spec: str | os.PathLike, near: Path | None) -> Path:
        for base in (near, Path.cwd(), self.rootdir):
            if base is not None and (base / spec).is_file():
                return (base / spec).resolve()
        raise pytest.UsageError(f"tagway_gate: spec file {str(spec)!r} not found (relative to the test file or "
                                "the working directory)")

    def parsed(self, spec: Path, dataset: str | None, overrides: dict) -> Any:
        from .spec import SpecError, apply_overrides, load_spec_data, parse_spec
        try:
            data = apply_overrides(load_spec_data(spec), dataset=dataset, **overrides)
            return parse_spec(data, str(spec))
        except SpecError as e:
            raise pytest.UsageError(f"tagway_gate: {e}") from None

    def segments(self, spec: Path, dataset: str | None, overrides: dict) -> list[str]:
        """The segments a gate will report, known before it runs: a dataset's (sorted)."""
        from .datasets.resolve import resolve
        parsed = self.parsed(spec, dataset, overrides)
        if parsed.dataset is None:
            raise pytest.UsageError("tagway_gate: tagway_segment needs a dataset (a slice's segments are known only "
                                    "once it is sampled)")
        try:
            return sorted({c.segment for c in resolve(self.store, parsed.dataset).cases})
        except Exception as e:  # an unknown dataset, an unreachable store: one line, at collection
            raise pytest.UsageError(f"tagway_gate: dataset {parsed.dataset!r}: {e}") from None

    def report(self, spec: Path, dataset: str | None, overrides: dict) -> Any:
        key = (str(spec), dataset, tuple(sorted((k, repr(v)) for k, v in overrides.items())))
        if key not in self._reports:
            from .pipeline import RunOptions, new_run_id, start_run
            from .runner import gateway_for
            from .evaluators import EvaluatorError, load_python_evaluators
            parsed = self.parsed(spec, dataset, overrides)
            sys.path[:0] = [str(spec.parent), os.getcwd()]  # `python` evaluators beside the spec, as the CLI does
            try:  # as `tagway replay run`: one that cannot be loaded fails the test before a call is paid for
                load_python_evaluators(parsed.evaluators)
            except EvaluatorError as e:
                self._reports[key] = (f"tagway_gate: {spec}: evaluators: {e} (looked in {spec.parent} and the "
                                      "working directory); nothing was run")
                return self._reports[key]
            try:
                # --gateway, else the gateway serving the store (as `tagway replay run` finds it), else in-process
                gateway = self.gateway or gateway_for(None, self.store)
                opts = RunOptions(gateway_url=gateway, in_process=gateway is None, api_key=self.api_key,
                                  progress=False, spec_dir=spec.parent, run_id=new_run_id(), gateway_config=self.config)
                self._reports[key] = asyncio.run(start_run(self.store, parsed, opts)).report
            except Exception as e:  # bad input, an unreachable gateway or store: the test fails with one line
                self._reports[key] = f"tagway_gate: the gate could not run: {type(e).__name__}: {e}"
        return self._reports[key]

    def close(self) -> None:
        if self._store is not None:
            self._store.close()
            self._store = None


def failure(report: Any, segment: str | None) -> str | None:
    """Why the gate (or one segment of it) did not pass, with the per-segment table; None when it passed."""
    from .render import render_terminal
    if isinstance(report, str):  # the gate could not run
        return report
    if segment is None:
        if report.exit_code == EXIT_PASS:
            return None
        head = f"tagway gate {report.verdict.upper()} (run {report.run_id}, exit {report.exit_code})"
    else:
        blocks = report.gating.get("inconclusive") == "block"
        rows = [r for c in report.candidates for r in c.rows if r.segment == segment]
        if not rows:
            return f"tagway gate: segment {segment!r} has no result in run {report.run_id}"
        bad = [r for r in rows if r.verdict == REGRESSION or (blocks and r.verdict == INCONCLUSIVE)]
        if not bad and report.status == "complete":
            return None
        what = bad[0].verdict if bad else f"run {report.status}"
        head = f"tagway gate: segment {segment!r}: {what} (run {report.run_id}): {bad[0].why if bad else ''}"
    return head.rstrip(": ") + "\n" + render_terminal(report)


def _in_test(get: Callable[[], Any]) -> Any:
    """In a test, a spec that is not there or not valid fails the test with its one line, not with a traceback
    through this plugin (a pytest.UsageError raised in a test is shown as an error in the plugin's code). At
    collection (tagway_segment) the same errors stay usage errors: pytest stops with the line."""
    try:
        return get()
    except pytest.UsageError as e:
        why = str(e)
    pytest.fail(why, pytrace=False)  # outside the except: no "During handling of the above exception"


@pytest.fixture(scope="session")
def tagway_gates(pytestconfig: pytest.Config) -> Any:
    runner = GateRunner(pytestconfig)
    yield runner
    runner.close()


@pytest.fixture
def tagway_gate(tagway_gates: GateRunner, request: pytest.FixtureRequest) -> Any:
    """`tagway_gate(spec=..., dataset=..., segment=None, **overrides)` -> the Report; fails the test unless the gate
    (or the segment) passes. Overrides are `tagway replay run`'s: candidate_models=[...], gating={...}, ..."""
    near = Path(str(request.path)).parent

    def gate(spec: str | os.PathLike, dataset: str | None = None, segment: str | None = None, **overrides: Any) -> Any:
        report = _in_test(lambda: tagway_gates.report(tagway_gates.spec_path(spec, near), dataset, overrides))
        why = failure(report, segment)
        if why is not None:
            pytest.fail(why, pytrace=False)
        return report
    return gate


@pytest.fixture
def tagway_segment(request: pytest.FixtureRequest) -> str:
    """The segment of a per-segment gate test (parametrised from the marker's dataset)."""
    return request.param


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    mark = metafunc.definition.get_closest_marker(MARK)
    if mark is None or "tagway_segment" not in metafunc.fixturenames:
        return
    runner = GateRunner(metafunc.config)
    try:
        spec, dataset, overrides = _mark_args(mark)
        segments = runner.segments(runner.spec_path(spec, Path(str(metafunc.definition.path)).parent), dataset,
                                   overrides)
    finally:
        runner.close()
    metafunc.parametrize("tagway_segment", segments, ids=segments, indirect=True)


def _mark_args(mark: pytest.Mark) -> tuple[Any, str | None, dict]:
    kwargs = dict(mark.kwargs)
    spec = kwargs.pop("spec", mark.args[0] if mark.args else None)
    if spec is None:
        raise pytest.UsageError(f"@pytest.mark.{MARK} needs spec=...")
    return spec, kwargs.pop("dataset", None), kwargs


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> None:
    """A test marked tagway_gate runs its gate first (its failure is the test's), then its own body."""
    mark = item.get_closest_marker(MARK)
    if mark is None or not isinstance(item, pytest.Function):
        return
    runner: GateRunner = item._request.getfixturevalue("tagway_gates")
    spec, dataset, overrides = _mark_args(mark)
    segment = item.callspec.params.get("tagway_segment") if hasattr(item, "callspec") else None
    report = _in_test(lambda: runner.report(runner.spec_path(spec, Path(str(item.path)).parent), dataset, overrides))
    why = failure(report, segment)
    if why is not None:
        pytest.fail(why, pytrace=False)
