"""The Helm chart in helm/tagway renders what production needs.

Runs the real `helm` binary (`helm lint`, `helm template`) and parses the multi-document output with PyYAML.
Skipped only when no helm binary is found; install one with `bash helm/scripts/install-helm.sh`.
"""
from __future__ import annotations

import base64
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

CHART = Path(__file__).resolve().parent.parent / "helm" / "tagway"
HELM = shutil.which("helm")

pytestmark = pytest.mark.skipif(
    HELM is None,
    reason="helm binary not on PATH; install it with `bash helm/scripts/install-helm.sh` to run the chart tests",
)


def helm_template(tmp_path: Path, values: dict | None = None, chart: Path = CHART) -> list[dict]:
    """`helm template` with a values file; returns the rendered documents (empty ones dropped)."""
    args = [HELM, "template", "t", str(chart), "--namespace", "llm"]
    if values is not None:
        values_file = tmp_path / f"values-{len(list(tmp_path.glob('values-*')))}.yaml"
        values_file.write_text(yaml.safe_dump(values))
        args += ["-f", str(values_file)]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [d for d in yaml.safe_load_all(out.stdout) if d]


def helm_template_error(tmp_path: Path, values: dict) -> str:
    values_file = tmp_path / "bad-values.yaml"
    values_file.write_text(yaml.safe_dump(values))
    out = subprocess.run([HELM, "template", "t", str(CHART), "-f", str(values_file)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, "helm template should have refused these values"
    return out.stderr


def by_kind(docs: list[dict], kind: str) -> list[dict]:
    return [d for d in docs if d["kind"] == kind]


def one(docs: list[dict], kind: str) -> dict:
    found = by_kind(docs, kind)
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def gateway_container(workload: dict) -> dict:
    (container,) = [c for c in workload["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway"]
    return container


def secret_data(secret: dict) -> dict[str, str]:
    return {k: base64.b64decode(v).decode() for k, v in secret["data"].items()}


def chart_values() -> dict:
    return yaml.safe_load((CHART / "values.yaml").read_text())


_UNITS = {"": 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "Ki": 2**10, "Mi": 2**20, "Gi": 2**30,
          "Ti": 2**40}


def quantity_bytes(q: str) -> int:
    """A Kubernetes quantity of bytes (2Gi, 500M, 1073741824) as an int."""
    digits = q.rstrip("".join(_UNITS))
    return int(float(digits) * _UNITS[q[len(digits):]])


def wal_room(recording: dict | None = None) -> int:
    """What one gateway process's write-ahead log can take beside its spool (exporters/wal.py, under
    <spool_dir>/worker-<i>/wal): the in-memory backlog it mirrors, the batches in flight, two 8 MiB segments. The
    defaults are the gateway's own (gateway/config.py), so the chart cannot drift from them unnoticed."""
    from gateway.config import RecordingConfig

    r = RecordingConfig(**(recording or {}))
    return max(r.queue_max_bytes, r.batch_max_bytes) + 2 * r.batch_max_bytes + (16 << 20) if r.write_ahead else 0


def derived_spool_cap(volume: str, workers: int = 1, recording: dict | None = None) -> int:
    """The recording.spool_max_bytes the chart sets: 80% of the spool volume per process, less its write-ahead log."""
    return int(quantity_bytes(volume) * 0.8 / workers - wal_room(recording))


def rendered_config(docs: list[dict]) -> dict:
    cm = next(d for d in by_kind(docs, "ConfigMap") if "tagway.yaml" in (d.get("data") or {}))
    return yaml.safe_load(cm["data"]["tagway.yaml"])


def gateway_config_check(tmp_path: Path, docs: list[dict]) -> subprocess.CompletedProcess:
    """`tagway config check` on the rendered tagway.yaml, with the env the pod gets (a DSN nothing listens on: the
    check only warns that ClickHouse is unreachable; a config error exits 2)."""
    path = tmp_path / "rendered-tagway.yaml"
    path.write_text(next(d for d in by_kind(docs, "ConfigMap") if "tagway.yaml" in (d.get("data") or {}))
                    ["data"]["tagway.yaml"])
    env = {k: v for k, v in os.environ.items() if not k.startswith("TAGWAY_")}
    env.update(TAGWAY_STORAGE__DSN="http://default:pw@127.0.0.1:9/tagway", TAGWAY_ADMIN_KEY="admin",
               OPENAI_API_KEY="sk-test", LITELLM_LOCAL_MODEL_COST_MAP="True")
    return subprocess.run([sys.executable, "-m", "gateway.cli", "config", "check", "--config", str(path)],
                          capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path)


def test_helm_lint_passes():
    out = subprocess.run([HELM, "lint", "--strict", str(CHART)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_default_render_is_a_deployment_with_probes_security_and_spool(tmp_path):
    docs = helm_template(tmp_path)
    kinds = {d["kind"] for d in docs}
    assert {"Deployment", "Service", "HorizontalPodAutoscaler", "PodDisruptionBudget", "ConfigMap", "Secret",
            "ServiceAccount"} <= kinds
    assert "StatefulSet" not in kinds and "ServiceMonitor" not in kinds

    dep = one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = gateway_container(dep)
    assert c["command"] == ["tagway"]
    assert c["args"] == ["serve", "--config", "/etc/tagway/tagway.yaml", "--host", "0.0.0.0", "--port", "4000"]
    assert c["ports"] == [{"name": "http", "containerPort": 4000, "protocol": "TCP"}]
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["resources"]["requests"]["cpu"]  # the HPA's CPU utilisation needs a request

    assert c["securityContext"]["readOnlyRootFilesystem"] is True
    assert c["securityContext"]["allowPrivilegeEscalation"] is False
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0

    mounts = {m["name"]: m for m in c["volumeMounts"]}
    volumes = {v["name"]: v for v in pod["volumes"]}
    assert mounts["spool"]["mountPath"] == "/var/lib/tagway/spool"
    assert "emptyDir" in volumes["spool"]
    assert mounts["config"]["mountPath"] == "/etc/tagway" and mounts["config"]["readOnly"] is True
    assert volumes["config"]["configMap"]["name"] == one(docs, "ConfigMap")["metadata"]["name"]
    assert pod["terminationGracePeriodSeconds"] >= 60  # SIGTERM flushes the spool
    assert "checksum/config" in dep["spec"]["template"]["metadata"]["annotations"]
    assert "replicas" not in dep["spec"]  # the HPA owns the replica count

    # Secrets arrive as env vars named like the Secret's keys.
    secret = one(docs, "Secret")
    assert {"secretRef": {"name": secret["metadata"]["name"]}} in c["envFrom"]

    labels = dep["metadata"]["labels"]
    assert labels["app.kubernetes.io/name"] == "tagway" and labels["app.kubernetes.io/instance"] == "t"
    assert labels["app.kubernetes.io/managed-by"] == "Helm"


def test_service_hpa_and_pdb(tmp_path):
    docs = helm_template(tmp_path)
    svc = one(docs, "Service")
    assert svc["spec"]["type"] == "ClusterIP"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 4000, "targetPort": "http", "protocol": "TCP"}]
    dep = one(docs, "Deployment")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]

    hpa = one(docs, "HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["minReplicas"] == 2 and hpa["spec"]["maxReplicas"] == 10
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": dep["metadata"]["name"]}
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"

    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["apiVersion"] == "policy/v1"
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]


def test_secret_keys_are_env_var_names(tmp_path):
    docs = helm_template(tmp_path, {"secrets": {
        "adminKey": "admin-secret",
        "clickhouseDsn": "https://tagway:pw@ch.example.internal:8443/tagway",
        "providerKeys": {"OPENAI_API_KEY": "sk-test", "ANTHROPIC_API_KEY": ""},
        "extra": {"AZURE_API_KEY": "az-test"},
    }})
    data = secret_data(one(docs, "Secret"))
    assert data == {
        "TAGWAY_ADMIN_KEY": "admin-secret",
        "TAGWAY_STORAGE__DSN": "https://tagway:pw@ch.example.internal:8443/tagway",
        "OPENAI_API_KEY": "sk-test",  # empty provider keys are left out
        "AZURE_API_KEY": "az-test",
    }


def test_admin_key_is_generated_when_not_given(tmp_path):
    data = secret_data(one(helm_template(tmp_path), "Secret"))
    assert len(data["TAGWAY_ADMIN_KEY"]) == 40


def test_configmap_is_the_config_block_verbatim(tmp_path):
    docs = helm_template(tmp_path)
    rendered = yaml.safe_load(one(docs, "ConfigMap")["data"]["tagway.yaml"])
    # verbatim, plus the one key the chart derives (the spool cap, from the spool volume: see the spool tests)
    assert rendered.pop("recording") == {"spool_max_bytes": derived_spool_cap("2Gi")}
    assert rendered == chart_values()["config"]
    assert rendered["storage"]["spool_dir"] == "/var/lib/tagway/spool"
    assert rendered["admin_key_env"] == "TAGWAY_ADMIN_KEY"
    assert rendered["models"][0]["api_key_env"] == "OPENAI_API_KEY"
    assert "dsn" not in rendered["storage"]  # the DSN (with its password) comes from the Secret

    # A passthrough: keys the chart has never heard of arrive untouched, and a config change rolls the pods.
    config = chart_values()["config"]
    config["storage"]["cluster"] = "analytics"
    config["future_section"] = {"anything": [1, 2, 3]}
    docs2 = helm_template(tmp_path, {"config": config})
    assert yaml.safe_load(one(docs2, "ConfigMap")["data"]["tagway.yaml"]) == {
        **config, "recording": {"spool_max_bytes": derived_spool_cap("2Gi")}}
    checksum = lambda d: one(d, "Deployment")["spec"]["template"]["metadata"]["annotations"]["checksum/config"]
    assert checksum(docs) != checksum(docs2)


def test_existing_secret_is_referenced_not_created(tmp_path):
    docs = helm_template(tmp_path, {"secrets": {"existingSecret": "tagway-prod"}})
    assert by_kind(docs, "Secret") == []
    c = gateway_container(one(docs, "Deployment"))
    assert {"secretRef": {"name": "tagway-prod"}} in c["envFrom"]


def test_statefulset_servicemonitor_and_dashboards(tmp_path):
    # A copy of the chart with a dashboard in it (the real dashboards/ folder may still be empty).
    chart = tmp_path / "tagway"
    shutil.copytree(CHART, chart)
    (chart / "dashboards" / "tagway-overview.json").write_text('{"title": "tagway overview", "panels": []}')
    docs = helm_template(tmp_path, {
        "kind": "StatefulSet",
        "spool": {"persistence": {"enabled": True, "size": "10Gi", "storageClass": "fast"}},
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
        "grafana": {"dashboards": {"enabled": True}},
    }, chart=chart)
    assert by_kind(docs, "Deployment") == []

    sts = one(docs, "StatefulSet")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    assert claim["metadata"]["name"] == "spool"
    assert claim["spec"]["resources"]["requests"]["storage"] == "10Gi"
    assert claim["spec"]["storageClassName"] == "fast"
    assert "spool" not in {v["name"] for v in sts["spec"]["template"]["spec"]["volumes"]}
    mounts = {m["name"]: m["mountPath"] for m in gateway_container(sts)["volumeMounts"]}
    assert mounts["spool"] == "/var/lib/tagway/spool"

    services = {s["metadata"]["name"]: s for s in by_kind(docs, "Service")}
    assert services[sts["spec"]["serviceName"]]["spec"]["clusterIP"] == "None"
    assert one(docs, "HorizontalPodAutoscaler")["spec"]["scaleTargetRef"]["kind"] == "StatefulSet"

    sm = one(docs, "ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["endpoints"][0]["port"] == "http"
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"

    (dash,) = [cm for cm in by_kind(docs, "ConfigMap") if cm["metadata"]["name"].endswith("-dashboards")]
    assert dash["metadata"]["labels"]["grafana_dashboard"] == "1"
    shipped = {p.name for p in (CHART / "dashboards").glob("*.json")}
    assert set(dash["data"]) == {"tagway-overview.json"} | shipped  # .gitkeep is not a dashboard
    assert '"tagway overview"' in dash["data"]["tagway-overview.json"]


def test_dashboards_enabled_with_no_dashboards_renders_nothing(tmp_path):
    docs = helm_template(tmp_path, {"grafana": {"dashboards": {"enabled": True}}})
    if not list((CHART / "dashboards").glob("*.json")):
        assert [cm for cm in by_kind(docs, "ConfigMap") if cm["metadata"]["name"].endswith("-dashboards")] == []


def test_autoscaling_off_sets_replicas(tmp_path):
    docs = helm_template(tmp_path, {"autoscaling": {"enabled": False}, "replicaCount": 3})
    assert by_kind(docs, "HorizontalPodAutoscaler") == []
    assert one(docs, "Deployment")["spec"]["replicas"] == 3


def test_refuses_bad_combinations(tmp_path):
    assert "StatefulSet" in helm_template_error(tmp_path, {"spool": {"persistence": {"enabled": True}}})
    assert "chDB" in helm_template_error(tmp_path, {"secrets": {"clickhouseDsn": "chdb:///var/lib/tagway/data"}})
    config = chart_values()["config"]
    config["storage"]["spool_dir"] = "/somewhere/else"
    assert "spool.mountPath" in helm_template_error(tmp_path, {"config": config})
    config["storage"]["spool_dir"] = None  # values merge over the defaults; null removes the key
    assert "spool_dir is not set" in helm_template_error(tmp_path, {"config": config})
    # a ServiceMonitor that would get 401 on every scrape
    guarded = {"config": {"metrics": {"auth": True}}, "serviceMonitor": {"enabled": True}}
    assert "set serviceMonitor.authorization" in helm_template_error(tmp_path, guarded)
    auth = {"type": "Bearer", "credentials": {"name": "tagway", "key": "TAGWAY_ADMIN_KEY"}}
    (monitor,) = by_kind(helm_template(tmp_path, {**guarded, "serviceMonitor": {"enabled": True,
                                                                               "authorization": auth}}),
                         "ServiceMonitor")
    assert monitor["spec"]["endpoints"][0]["authorization"] == auth


# -- the spool cap fits the spool volume ----------------------------------------------------------------------------
def test_spool_cap_is_derived_from_the_emptydir_and_passes_config_check(tmp_path):
    """The gateway's own default cap (5 GiB) outgrew the 2Gi emptyDir: in a long ClickHouse outage the kubelet would
    evict the pod (spool and write-ahead log deleted, nothing counted) before the cap applied."""
    docs = helm_template(tmp_path)
    volumes = one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"]
    (spool_volume,) = [v for v in volumes if v["name"] == "spool"]
    volume = quantity_bytes(spool_volume["emptyDir"]["sizeLimit"])
    cap = rendered_config(docs)["recording"]["spool_max_bytes"]
    assert cap == derived_spool_cap("2Gi") == 1365665382  # 1302 MiB
    assert cap + wal_room() <= 0.8 * volume  # spool + write-ahead log (both under spool_dir) leave 20% free

    check = gateway_config_check(tmp_path, docs)
    assert check.returncode == 0 and "warning(s): 1 models" in check.stdout, check.stdout + check.stderr
    from gateway.config import load_config

    assert load_config(tmp_path / "rendered-tagway.yaml").recording.spool_max_bytes == cap


def test_spool_cap_follows_the_pvc_the_workers_and_the_recording_limits(tmp_path):
    sts = {"kind": "StatefulSet", "spool": {"persistence": {"enabled": True}}}
    assert rendered_config(helm_template(tmp_path, sts))["recording"]["spool_max_bytes"] == derived_spool_cap("5Gi")
    pvc = {"kind": "StatefulSet", "spool": {"persistence": {"enabled": True, "size": "20Gi"}}}
    assert rendered_config(helm_template(tmp_path, pvc))["recording"]["spool_max_bytes"] == derived_spool_cap("20Gi")
    # `serve --workers N`: N processes, each with its own spool slot, write-ahead log and cap
    for args in (["--workers", "4"], ["--workers=4"]):
        docs = helm_template(tmp_path, {"extraArgs": args, "spool": {"emptyDir": {"sizeLimit": "8Gi"}}})
        cap = rendered_config(docs)["recording"]["spool_max_bytes"]
        assert cap == derived_spool_cap("8Gi", workers=4) and 4 * (cap + wal_room()) <= quantity_bytes("8Gi")
    # the write-ahead log's room follows the config's own limits
    recording = {"queue_max_bytes": 64 << 20, "batch_max_bytes": 8 << 20}
    docs = helm_template(tmp_path, {"config": {"recording": recording}})
    assert rendered_config(docs)["recording"] == {**recording,
                                                  "spool_max_bytes": derived_spool_cap("2Gi", recording=recording)}
    assert gateway_config_check(tmp_path, docs).returncode == 0
    # no size limit: nothing to derive from, the gateway's default applies
    unbounded = rendered_config(helm_template(tmp_path, {"spool": {"emptyDir": {"sizeLimit": ""}}}))
    assert "spool_max_bytes" not in (unbounded.get("recording") or {})


def test_spool_cap_set_by_hand_is_kept_when_it_fits_and_refused_when_it_does_not(tmp_path):
    docs = helm_template(tmp_path, {"config": {"recording": {"spool_max_bytes": 1 << 30}}})
    assert rendered_config(docs)["recording"]["spool_max_bytes"] == 1 << 30
    for too_big in (2 << 30, 0):  # the volume itself; 0 = no cap
        err = helm_template_error(tmp_path, {"config": {"recording": {"spool_max_bytes": too_big}}})
        assert "config.recording.spool_max_bytes" in err and "does not fit the spool volume" in err, err
    err = helm_template_error(tmp_path, {"spool": {"emptyDir": {"sizeLimit": "256Mi"}}})
    assert "spool.emptyDir.sizeLimit 256Mi" in err and "too small" in err, err
    assert "not a size" in helm_template_error(tmp_path, {"spool": {"emptyDir": {"sizeLimit": "2GB"}}})


# -- the ClickHouse DSN --------------------------------------------------------------------------------------------
def test_an_empty_dsn_fails_the_render(tmp_path):
    """Without a DSN the gateway fell back to its embedded store under the read-only working directory and
    crash-looped; the chart rendered it without a word."""
    for empty in ("", None, "  "):
        err = helm_template_error(tmp_path, {"secrets": {"clickhouseDsn": empty}})
        assert "secrets.clickhouseDsn is empty" in err and "existingSecret" in err, err
    # a DSN in the config itself is enough
    docs = helm_template(tmp_path, {"secrets": {"clickhouseDsn": ""},
                                    "config": {"storage": {"dsn": "https://u:p@ch.example.internal:8443/tagway"}}})
    assert "TAGWAY_STORAGE__DSN" not in secret_data(one(docs, "Secret"))


def test_existing_secret_dsn_is_a_required_key_reference(tmp_path):
    """An existingSecret without the DSN key started gateways with no store (envFrom skips missing keys); a
    secretKeyRef that is not optional keeps the pod in CreateContainerConfigError with "couldn't find key"."""
    docs = helm_template(tmp_path, {"secrets": {"existingSecret": "tagway-prod"}, "migrations": {"enabled": True}})
    required = {"name": "TAGWAY_STORAGE__DSN",
                "valueFrom": {"secretKeyRef": {"name": "tagway-prod", "key": "TAGWAY_STORAGE__DSN"}}}
    assert required in gateway_container(one(docs, "Deployment"))["env"]  # no `optional`: it defaults to false
    (job,) = by_kind(docs, "Job")
    assert required in job["spec"]["template"]["spec"]["containers"][0]["env"]

    docs = helm_template(tmp_path, {"secrets": {"existingSecret": "vault-tagway", "existingSecretDsnKey": "dsn"}})
    env = {e["name"]: e for e in gateway_container(one(docs, "Deployment"))["env"]}
    assert env["TAGWAY_STORAGE__DSN"]["valueFrom"] == {"secretKeyRef": {"name": "vault-tagway", "key": "dsn"}}
    # an explicit extraEnv entry of the same name is the user's: not doubled
    own = {"name": "TAGWAY_STORAGE__DSN", "valueFrom": {"secretKeyRef": {"name": "other", "key": "url"}}}
    docs = helm_template(tmp_path, {"secrets": {"existingSecret": "tagway-prod"}, "extraEnv": [own]})
    assert [e for e in gateway_container(one(docs, "Deployment"))["env"]
            if e["name"] == "TAGWAY_STORAGE__DSN"] == [own]


def test_chdb_and_other_dsn_schemes_are_refused_in_any_case(tmp_path):
    for dsn in ("CHDB:///var/lib/tagway/data", "ChDb:///x", " chdb:///x"):
        assert "chDB" in helm_template_error(tmp_path, {"secrets": {"clickhouseDsn": dsn}})
        assert "chDB" in helm_template_error(tmp_path, {"config": {"storage": {"dsn": dsn}}})
    err = helm_template_error(tmp_path, {"secrets": {"clickhouseDsn": "clickhouse://ch:9000/tagway"}})
    assert "http(s)://" in err, err
    docs = helm_template(tmp_path, {"secrets": {"clickhouseDsn": "HTTPS://u:p@ch:8443/tagway"}})  # as the gateway
    assert secret_data(one(docs, "Secret"))["TAGWAY_STORAGE__DSN"] == "HTTPS://u:p@ch:8443/tagway"


# -- values the API server or the gateway would refuse later -------------------------------------------------------
def helm_set_error(*sets: str, command: str = "template") -> str:
    args = [HELM, command, *(["t"] if command == "template" else []), str(CHART)]
    for s in sets:
        args += ["--set", s]
    out = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert out.returncode != 0, f"helm {command} should have refused {sets}"
    return out.stdout + out.stderr


def test_bad_port_replicas_and_shutdown_timing_are_refused(tmp_path):
    for command in ("template", "lint"):  # values.schema.json: helm lint refuses these too
        assert "/containerPort': got string, want integer" in helm_set_error("containerPort=abc", command=command)
        assert "/containerPort': maximum" in helm_set_error("containerPort=70000", command=command)
    # checks across values are the templates' `fail`s (helm lint only logs those, at INFO; template/install fail)
    err = helm_set_error("autoscaling.minReplicas=5", "autoscaling.maxReplicas=3")
    assert "autoscaling.minReplicas (5) is greater than autoscaling.maxReplicas (3)" in err, err
    err = helm_set_error("preStopSleepSeconds=90")  # = terminationGracePeriodSeconds
    assert "preStopSleepSeconds (90) must be less than terminationGracePeriodSeconds (90)" in err, err
    # the same through a values file (numbers arrive as floats there)
    assert "containerPort" in helm_template_error(tmp_path, {"containerPort": "4000x"})
    assert "minReplicas" in helm_template_error(tmp_path, {"autoscaling": {"minReplicas": 4, "maxReplicas": 2}})
    assert "preStopSleepSeconds" in helm_template_error(tmp_path, {"preStopSleepSeconds": 120,
                                                                    "terminationGracePeriodSeconds": 60})
    # and what is fine still renders: the HPA off ignores its bounds, a preStop sleep inside the grace period
    helm_template(tmp_path, {"autoscaling": {"enabled": False, "minReplicas": 5, "maxReplicas": 3}})
    pod = one(helm_template(tmp_path, {"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 60,
                                       "containerPort": 8080}), "Deployment")["spec"]["template"]["spec"]
    assert gateway_container({"spec": {"template": {"spec": pod}}})["ports"][0]["containerPort"] == 8080
    assert pod["terminationGracePeriodSeconds"] == 60


def test_rendered_config_is_a_valid_gateway_config(tmp_path, monkeypatch):
    from gateway.config import load_config

    cm = next(d for d in by_kind(helm_template(tmp_path), "ConfigMap") if "tagway.yaml" in (d.get("data") or {}))
    path = tmp_path / "tagway.yaml"
    path.write_text(cm["data"]["tagway.yaml"])
    monkeypatch.setenv("TAGWAY_STORAGE__DSN", "http://default:pw@clickhouse:8123/tagway")  # from the Secret
    cfg = load_config(path)
    assert cfg.storage.resolved_dsn().startswith("http://") and cfg.models


# -- alert rules ---------------------------------------------------------------------------------------------------
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not on PATH (Debian package `prometheus`; "
                                                              "tests/run.sh installs it)")


def prometheus_rule(tmp_path: Path, values: dict | None = None) -> dict:
    return one(helm_template(tmp_path, {"prometheusRule": {"enabled": True, **(values or {})}}), "PrometheusRule")


def test_prometheus_rule_is_off_by_default_and_selects_the_scraped_job(tmp_path):
    assert by_kind(helm_template(tmp_path), "PrometheusRule") == []
    rule = prometheus_rule(tmp_path, {"labels": {"release": "kube-prometheus-stack"}})
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    (group,) = rule["spec"]["groups"]
    assert [r["alert"] for r in group["rules"]] == ["TagwayModelErrorRateHigh", "TagwaySpoolGrowing",
                                                     "TagwaySpansDropped"]
    svc = one(helm_template(tmp_path, {"serviceMonitor": {"enabled": True}}), "Service")
    for r in group["rules"]:  # the ServiceMonitor's job label is the Service's name
        assert f'job="{svc["metadata"]["name"]}"' in r["expr"] and 'namespace="llm"' in r["expr"]


@needs_promtool
def test_alert_rules_are_valid_and_fire_when_they_should(tmp_path):
    """promtool checks the rules and evaluates them over made-up series: a model failing 20% of its calls, a quiet
    model failing every call (no page), a busy model half of whose calls tagway refuses for rate limits and budgets
    (no page: the tenants' doing, not the model's), a spool that grows and one that holds steady, spans dropped or
    quarantined on two pods."""
    rule = prometheus_rule(tmp_path, {"errorRate": {"threshold": 0.05, "minCallsPerSecond": 0.1, "for": "10m",
                                                    "severity": "warning"}})
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 3 rules found" in check.stdout, check.stdout + check.stderr

    job = 'namespace="llm", job="t-tagway"'
    call = 'operation="chat", provider="openai"'
    series = [
        (f'tagway_calls_total{{{job}, {call}, model="gpt", status_class="2xx"}}', "0+48x40"),  # 0.8/s ok
        (f'tagway_calls_total{{{job}, {call}, model="gpt", status_class="5xx"}}', "0+12x40"),  # 0.2/s failing
        (f'tagway_call_errors_total{{{job}, {call}, model="gpt", error_type="http_500"}}', "0+12x40"),
        (f'tagway_calls_total{{{job}, {call}, model="rare", status_class="5xx"}}', "0+1x40"),  # 1/min, all fail
        (f'tagway_call_errors_total{{{job}, {call}, model="rare", error_type="timeout"}}', "0+1x40"),
        # 2/s, half of them refused by tagway itself (429 rate_limited / budget_exceeded) or bad requests upstream
        (f'tagway_calls_total{{{job}, {call}, model="busy", status_class="2xx"}}', "0+60x40"),
        (f'tagway_calls_total{{{job}, {call}, model="busy", status_class="4xx"}}', "0+60x40"),
        (f'tagway_call_errors_total{{{job}, {call}, model="busy", error_type="rate_limited"}}', "0+40x40"),
        (f'tagway_call_errors_total{{{job}, {call}, model="busy", error_type="budget_exceeded"}}', "0+15x40"),
        (f'tagway_call_errors_total{{{job}, {call}, model="busy", error_type="http_400"}}', "0+5x40"),
        # streams that start (200) and then break: counted, though their status class is 2xx
        (f'tagway_calls_total{{{job}, {call}, model="streamy", status_class="2xx"}}', "0+30x40"),
        (f'tagway_call_errors_total{{{job}, {call}, model="streamy", error_type="stream_cut"}}', "0+3x40"),
        (f'tagway_spool_spans_pending{{{job}, pod="p1"}}', "0+100x40"),  # growing
        (f'tagway_spool_spans_pending{{{job}, pod="p2"}}', "500x40"),  # steady: ClickHouse is slow, not down
        (f'tagway_spans_dropped_total{{{job}, pod="p1"}}', "0x10 7x30"),
        (f'tagway_spans_quarantined_total{{{job}, pod="p1"}}', "0x40"),
        (f'tagway_spans_dropped_total{{{job}, pod="p2"}}', "0x40"),
        (f'tagway_spans_quarantined_total{{{job}, pod="p2"}}', "0x40"),
    ]
    error_rate = {"exp_labels": {"severity": "warning", "namespace": "llm", "model": "gpt"},
                  "exp_annotations": {
                      "summary": "tagway: gpt fails 20% of its calls upstream",
                      "description": "More than 5% of the calls to model gpt failed upstream or in the gateway for "
                                     "10m (provider 5xx, provider auth or 429, timeouts, connection, protocol or "
                                     "stream errors, gateway errors). Refusals by the gateway (rate_limited, "
                                     "budget_exceeded, keys, invalid requests), provider 4xx answers to bad requests "
                                     "and client hang-ups are not counted. `tagway errors --where model=gpt --since "
                                     "1h` shows the error types and example trace ids."}}
    streamy = {"exp_labels": {**error_rate["exp_labels"], "model": "streamy"},
               "exp_annotations": {k: v.replace("gpt", "streamy").replace("20%", "10%")
                                   for k, v in error_rate["exp_annotations"].items()}}
    cap = derived_spool_cap("2Gi")  # the cap the chart set (the old text promised nothing lost until the volume was full)
    spool = {"exp_labels": {"severity": "warning", "namespace": "llm", "pod": "p1"},
             "exp_annotations": {
                 "summary": "tagway: the spool of p1 keeps growing",
                 "description": "p1 cannot write its spans to ClickHouse and they pile up in its spool (3k spans "
                                "waiting). Its /readyz says why (reason). Once the spool reaches "
                                f"recording.spool_max_bytes ({cap} bytes, {cap >> 20} MiB), the gateway drops the "
                                "oldest spans, counted (TagwaySpansDropped). The spool is an emptyDir: it is lost "
                                "if the pod is deleted meanwhile (rollout, drain, eviction)."}}
    dropped = {"exp_labels": {"severity": "critical", "namespace": "llm", "pod": "p1"},
               "exp_annotations": {
                   "summary": "tagway: p1 lost 7 spans",
                   "description": "Spans were dropped (the spool could not be written, or is full) or set aside as "
                                  "*.poison (ClickHouse refuses their rows) by p1. Its log has the reason at ERROR; "
                                  "`tagway db spool list` shows the quarantined files."}}
    tests = {"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": [{
        "interval": "1m",
        "input_series": [{"series": s, "values": v} for s, v in series],
        "alert_rule_test": [
            {"eval_time": "5m", "alertname": "TagwayModelErrorRateHigh", "exp_alerts": []},  # not for 10m yet
            {"eval_time": "20m", "alertname": "TagwayModelErrorRateHigh", "exp_alerts": [error_rate, streamy]},
            {"eval_time": "10m", "alertname": "TagwaySpoolGrowing", "exp_alerts": []},
            {"eval_time": "30m", "alertname": "TagwaySpoolGrowing", "exp_alerts": [spool]},
            {"eval_time": "9m", "alertname": "TagwaySpansDropped", "exp_alerts": []},
            {"eval_time": "12m", "alertname": "TagwaySpansDropped", "exp_alerts": [dropped]},
        ]}]}
    test_file = tmp_path / "rules-test.yaml"
    test_file.write_text(yaml.safe_dump(tests, width=1000))
    run = subprocess.run([PROMTOOL, "test", "rules", str(test_file)], capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stdout + run.stderr


def test_a_keys_file_from_a_secret_as_the_helm_readme_shows(tmp_path):
    docs = helm_template(tmp_path, {"config": {"keys_file": "/etc/tagway-keys/tagway.keys.yaml"},
                                    "extraVolumes": [{"name": "keys", "secret": {"secretName": "tagway-keys"}}],
                                    "extraVolumeMounts": [{"name": "keys", "mountPath": "/etc/tagway-keys",
                                                           "readOnly": True}]})
    dep = one(docs, "Deployment")
    mounts = {m["name"]: m for m in gateway_container(dep)["volumeMounts"]}
    assert mounts["keys"]["mountPath"] == "/etc/tagway-keys" and mounts["keys"]["readOnly"] is True
    volumes = {v["name"]: v for v in dep["spec"]["template"]["spec"]["volumes"]}
    assert volumes["keys"]["secret"]["secretName"] == "tagway-keys"
    cm = next(d for d in by_kind(docs, "ConfigMap") if "tagway.yaml" in (d.get("data") or {}))
    assert yaml.safe_load(cm["data"]["tagway.yaml"])["keys_file"] == "/etc/tagway-keys/tagway.keys.yaml"


def test_the_gateways_grace_fits_the_pods(tmp_path):
    """The gateway gives calls in flight server.graceful_shutdown_seconds (60 s by default) at SIGTERM; a pod grace
    that ends first SIGKILLs it mid-call and mid-flush. Unset, the chart lowers it to fit; set too high, it refuses."""
    def server(values: dict) -> dict:
        return yaml.safe_load(one(helm_template(tmp_path, values), "ConfigMap")["data"]["tagway.yaml"]).get("server",
                                                                                                                {})
    assert "graceful_shutdown_seconds" not in server({})  # 90 - 5 - 5 = 80: the gateway's 60 fits
    assert server({"preStopSleepSeconds": 10, "terminationGracePeriodSeconds": 60})["graceful_shutdown_seconds"] == 45
    config = chart_values()["config"]
    config["server"] = {**config.get("server", {}), "graceful_shutdown_seconds": 120}
    err = helm_template_error(tmp_path, {"config": config})
    assert "config.server.graceful_shutdown_seconds (120) does not fit terminationGracePeriodSeconds (90)" in err, err
    assert server({"config": config, "terminationGracePeriodSeconds": 200})["graceful_shutdown_seconds"] == 120
