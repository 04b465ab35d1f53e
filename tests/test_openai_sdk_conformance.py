"""openai-python's own API-resource tests (chat, completions, embeddings, models, responses) against a spec-driven
mock of the OpenAI API (Prism, tests/spec_mock.py), run twice: directly, and through tagway (a `*` route to the same
mock). Every test must end the same way both times: tagway carries whatever the SDK sends and answers it as the API
would. tests/run.sh installs Prism and the openai sdist's tests (matching the installed openai); without them this
is skipped, saying what is missing.

The whole suite (every resource) runs by hand with `TAGWAY_SDK_CONFORMANCE=all python -m pytest -s
tests/test_openai_sdk_conformance.py`: it prints each resource's outcomes both ways and requires the same for the
resources tagway carries (the others answer an OpenAI-shaped 404 through tagway, by design).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from exporters import semconv as sc
from gateway.app import TagwayApp
from gateway.auth import hash_key
from gateway.config import GatewayConfig
from tests.gateway_fixture import GatewayServer, MemoryRecorder
from tests.spec_mock import Prism, StreamingFront, openai_tests_dir, prism_bin, spec_path

SUBSET = ["chat", "test_completions.py", "test_embeddings.py", "test_models.py", "test_responses.py", "responses"]
# resources tagway carries beyond the subset (gateway/routes_table.py): by hand, with TAGWAY_SDK_CONFORMANCE=all
CARRIED = {*SUBSET, "test_moderations.py", "test_images.py", "audio", "test_files.py", "test_batches.py"}
SDK_KEY = "My API Key"  # what openai-python's tests send


@pytest.fixture(scope="module")
def mock():
    spec, binary, tests = spec_path(), prism_bin(), openai_tests_dir()
    missing = [what for what, have in (("the OpenAPI spec (tests/data/openai.openapi.yml.gz)", spec), ("prism", binary),
                                       ("openai-python's tests", tests)) if not have]
    if missing:
        pytest.skip(f"needs {', '.join(missing)}: run tests/run.sh, which installs them")
    prism = Prism(spec, binary).wait()
    front = StreamingFront(prism.url).start()
    yield front, tests
    front.stop()
    prism.stop()


@pytest.fixture(scope="module")
def tagway(mock):
    front, _ = mock
    os.environ["CONFORMANCE_UPSTREAM_KEY"] = "sk-conformance"
    cfg = GatewayConfig(models=[{"name": "*", "provider": "openai", "base_url": front.url,
                                 "api_key_env": "CONFORMANCE_UPSTREAM_KEY", "timeout": 60}],
                        tenants=[{"customer": "sdk", "keys": [{"id": "sdk", "hash": hash_key(SDK_KEY)}]}],
                        server={"max_body_bytes": 32 * 1024 * 1024},
                        # the SDK's tests name made-up resource ids: the wire is what is compared here
                        api={"tenant_resources": "shared"})
    recorder = MemoryRecorder()
    server = GatewayServer(TagwayApp(cfg, recorder=recorder)).start()
    server.recorder = recorder
    yield server
    server.stop()
    recorder.shutdown()


def resource_of(test_id: str) -> str:
    """tests.api_resources.chat.test_completions.X::y -> chat; tests.api_resources.test_files.X::y -> test_files.py"""
    part = test_id.split("::")[0].split(".")[2]
    return part if not part.startswith("test_") else part + ".py"


def run_sdk_tests(tests: Path, base_url: str, paths: list[str], out: Path, timeout: float,
                  select: list[str]) -> dict[str, str]:
    """Run openai-python's tests against `base_url`; test id -> passed | failed | skipped."""
    # not this session's xdist worker variables: a plugin of the inner run (pytest-benchmark, where installed) then
    # warns that xdist is active, which openai's warnings-as-errors turn into an INTERNALERROR and no report
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST_")}
    env["TEST_API_BASE_URL"] = base_url
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-o", "addopts=", "-p", "no:cacheprovider", *select,
                          f"--junitxml={out}", *[str(tests / "tests" / "api_resources" / p) for p in paths]],
                         cwd=tests, env=env, capture_output=True, timeout=timeout)
    assert out.exists(), f"openai-python's tests wrote no report (exit {run.returncode}): " \
        f"{(run.stdout + run.stderr).decode(errors='replace')[-2000:]}"
    outcomes = {}
    for case in ET.parse(out).getroot().iter("testcase"):
        name = f"{case.get('classname')}::{case.get('name')}"
        kinds = {c.tag for c in case}
        outcomes[name] = "failed" if kinds & {"failure", "error"} else "skipped" if "skipped" in kinds else "passed"
    return outcomes


def test_openai_python_tests_pass_through_tagway_as_directly(mock, tagway, tmp_path):
    front, tests = mock
    everything = os.environ.get("TAGWAY_SDK_CONFORMANCE") == "all"
    paths = sorted(p.name for p in (tests / "tests" / "api_resources").iterdir() if p.name != "__init__.py") \
        if everything else SUBSET
    timeout = 7200 if everything else 900
    # In CI, each test's `strict` variant (sync and async clients, strict response validation): the `loose` and
    # `aiohttp` variants send the same requests and differ only inside the SDK. By hand (`all`), every variant.
    select = [] if everything or os.environ.get("TAGWAY_SDK_CONFORMANCE") == "variants" else ["-k", "strict"]
    # both runs at once (the mock answers each request on its own): tagway's requests are those with its key
    with ThreadPoolExecutor(2) as pool:
        runs = [pool.submit(run_sdk_tests, tests, url, paths, tmp_path / xml, timeout, select)
                for url, xml in ((front.url, "direct.xml"), (tagway.url + "/v1", "tagway.xml"))]
        direct, through = (r.result() for r in runs)
    forwarded = front.by_key[f"Bearer {os.environ['CONFORMANCE_UPSTREAM_KEY']}"]
    assert len(direct) > 150 and direct.keys() == through.keys()
    if everything:
        for res in sorted({resource_of(t) for t in direct}):
            ids = [t for t in direct if resource_of(t) == res]
            print(f"{res:32} {'carried' if res in CARRIED else 'not carried':12} direct "
                  f"{sum(direct[t] == 'passed' for t in ids):5}/{len(ids):<5} through tagway "
                  f"{sum(through[t] == 'passed' for t in ids):5}/{len(ids)}")
    differ = {t: (direct[t], through[t]) for t in direct if direct[t] != through[t] and resource_of(t) in CARRIED}
    assert not differ, f"{len(differ)} of {len(direct)} tests end differently through tagway: " + \
        "; ".join(f"{t}: {a} -> {b}" for t, (a, b) in sorted(differ.items())[:20])
    passed = sum(v == "passed" for v in through.values())
    print(f"openai-python {paths}: {passed}/{len(through)} passed, through tagway as directly")
    # every request tagway forwarded is a recorded call (one attempt each: a `*` route has no fallbacks)
    deadline = time.monotonic() + 10
    while True:
        spans = [s for s in tagway.recorder.exporter.get_finished_spans()
                 if s.attributes.get(sc.KIND) == "call" and s.attributes.get(sc.ATTEMPTS)]
        if len(spans) >= forwarded or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert forwarded > 100 and len(spans) == forwarded
