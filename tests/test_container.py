"""The container pieces: the Dockerfile lints clean (hadolint) and agrees with the Helm chart and the package (image
tag, uid, port, entrypoint, health check, data volume); compose.yaml validates against the compose-spec schema and
wires tagway, ClickHouse and Grafana together; the image's default config is a valid gateway config.

A real build is `bash docker/smoke-test.sh` (podman from Debian; minutes, so not part of the suite by default):
set TAGWAY_CONTAINER_SMOKE=1 to run it here."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
CHART = ROOT / "helm" / "tagway"


def _tool(name: str) -> str:
    """A console script installed with the test extras (beside this interpreter), or on PATH."""
    here = Path(sys.executable).parent / name
    found = str(here) if here.exists() else shutil.which(name)
    assert found, f"{name} is not installed: pip install -e '.[test]' installs it"
    return found


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined, comments dropped."""
    text = re.sub(r"\\\n\s*", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def final_stage() -> list[tuple[str, str]]:
    ins = instructions()
    last_from = max(i for i, (word, _) in enumerate(ins) if word == "FROM")
    return ins[last_from:]


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


def app_version() -> str:
    return yaml.safe_load((CHART / "Chart.yaml").read_text())["appVersion"]


def test_dockerfile_lints_clean():
    out = subprocess.run([_tool("hadolint"), "--failure-threshold", "style", str(DOCKERFILE)],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_dockerfile_is_multi_stage_slim_and_non_root():
    froms = [args for word, args in instructions() if word == "FROM"]
    assert len(froms) >= 2 and "AS build" in froms[0]
    default_base = next(args for word, args in instructions() if word == "ARG" and args.startswith("PYTHON_IMAGE="))
    assert re.fullmatch(r"PYTHON_IMAGE=python:3\.11-slim(-\w+)?", default_base)
    final = final_stage()
    (user,) = [args for word, args in final if word == "USER"]
    assert user == "10001:10001"
    assert ("COPY", "--from=build /opt/tagway /opt/tagway") in final  # no compiler or build cache in the image


def test_dockerfile_agrees_with_the_chart_and_the_package():
    final = dict(final_stage())
    values = chart_values()
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert app_version() == version
    assert f"ARG VERSION={version}" in f"ARG {final['ARG']}"
    assert final["USER"].split(":")[0] == str(values["podSecurityContext"]["runAsUser"])
    assert final["EXPOSE"] == str(values["containerPort"])
    assert json.loads(final["ENTRYPOINT"]) == values["command"] == ["tagway"]
    assert json.loads(final["CMD"]) == ["serve"]
    assert "/healthz" in final["HEALTHCHECK"] and values["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert json.loads(final["VOLUME"]) == ["/var/lib/tagway"]
    # the README's build command makes the image the chart uses by default
    assert "docker build -t tagway:0.1.0 ." in (ROOT / "README.md").read_text()
    assert values["image"]["repository"] == "tagway" and values["image"]["tag"] in ("", version)


def test_chart_renders_the_default_image(tmp_path):
    helm = shutil.which("helm")
    if helm is None:
        pytest.skip("helm binary not on PATH; install it with `bash helm/scripts/install-helm.sh`")
    out = subprocess.run([helm, "template", "t", str(CHART)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (dep,) = [d for d in yaml.safe_load_all(out.stdout) if d and d["kind"] == "Deployment"]
    (c,) = [c for c in dep["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    assert c["image"] == f"tagway:{app_version()}"
    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert compose["services"]["tagway"]["image"] == c["image"]  # compose builds and tags the same image


def test_image_default_config_is_valid(monkeypatch):
    from gateway.config import load_config  # noqa: PLC0415

    monkeypatch.delenv("TAGWAY_STORAGE__DSN", raising=False)
    cfg = load_config(ROOT / "docker" / "tagway.yaml")
    final = dict(final_stage())
    assert cfg.storage.data_dir == json.loads(final["VOLUME"])[0]  # the embedded store lives in the volume
    assert cfg.storage.resolved_dsn() == "chdb:///var/lib/tagway/clickhouse"
    assert cfg.server.host == "0.0.0.0" and str(cfg.server.port) == final["EXPOSE"]
    assert cfg.keys_file.startswith("/var/lib/tagway/")  # writable by uid 10001; /etc/tagway is not
    assert "TAGWAY_CONFIG=/etc/tagway/tagway.yaml" in final["ENV"]


def test_compose_file_matches_the_compose_spec():
    out = subprocess.run([_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec",
                          str(ROOT / "compose.yaml")], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_compose_wires_tagway_clickhouse_and_grafana(monkeypatch):
    from gateway.config import load_config  # noqa: PLC0415

    compose = yaml.safe_load((ROOT / "compose.yaml").read_text())
    s = compose["services"]
    assert s["clickhouse"]["image"].startswith("clickhouse/clickhouse-server:")
    ch_env = s["clickhouse"]["environment"]
    tagway = s["tagway"]
    assert tagway["build"] == "." and tagway["depends_on"]["clickhouse"]["condition"] == "service_healthy"
    dsn = tagway["environment"]["TAGWAY_STORAGE__DSN"]
    assert dsn == (f"http://{ch_env['CLICKHOUSE_USER']}:{ch_env['CLICKHOUSE_PASSWORD']}@clickhouse:8123/"
                   f"{ch_env['CLICKHOUSE_DB']}")
    # the image's config with compose's environment: the ClickHouse server, not the embedded store
    monkeypatch.setenv("TAGWAY_STORAGE__DSN", "http://tagway:tagway@clickhouse:8123/tagway")
    assert load_config(ROOT / "docker" / "tagway.yaml").storage.resolved_dsn().startswith("http://tagway:")

    grafana = s["grafana"]
    assert "grafana-clickhouse-datasource" in grafana["environment"]["GF_INSTALL_PLUGINS"]
    mounts = {m.split(":")[1]: ROOT / m.split(":")[0] for m in grafana["volumes"] if m.startswith("./")}
    provisioning = mounts["/etc/grafana/provisioning"]
    (ds,) = yaml.safe_load((provisioning / "datasources" / "clickhouse.yaml").read_text())["datasources"]
    assert ds["type"] == "grafana-clickhouse-datasource" and ds["isDefault"] is True
    assert ds["jsonData"]["host"] == "clickhouse" and ds["jsonData"]["username"] == ch_env["CLICKHOUSE_USER"]
    assert ds["jsonData"]["defaultDatabase"] == ch_env["CLICKHOUSE_DB"]
    (provider,) = yaml.safe_load((provisioning / "dashboards" / "tagway.yaml").read_text())["providers"]
    dashboards = mounts[provider["options"]["path"]]
    shipped = list(dashboards.glob("*.json"))
    assert shipped, "the chart's dashboards folder is mounted and holds the shipped dashboard"
    for path in shipped:
        board = json.loads(path.read_text())
        types = {p.get("datasource", {}).get("type") for p in board["panels"] if p.get("datasource")}
        assert types == {ds["type"]}  # every panel uses the provisioned kind of data source


@pytest.mark.skipif(os.environ.get("TAGWAY_CONTAINER_SMOKE") != "1",
                    reason="a real image build takes minutes: set TAGWAY_CONTAINER_SMOKE=1 (needs root and "
                           "Debian's podman and debootstrap) or run `bash docker/smoke-test.sh`")
def test_image_builds_and_serves():
    out = subprocess.run(["bash", str(ROOT / "docker" / "smoke-test.sh")], capture_output=True, text=True,
                         timeout=3000)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "smoke test passed" in out.stdout
