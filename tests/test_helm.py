"""The Helm chart in helm/tagway renders what production needs.

Runs the real `helm` binary (`helm lint`, `helm template`) and parses the multi-document output with PyYAML.
Skipped only when no helm binary is found; install one with `bash helm/scripts/install-helm.sh`.
"""
from __future__ import annotations

import base64
import shutil
import subprocess
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
    assert yaml.safe_load(one(docs2, "ConfigMap")["data"]["tagway.yaml"]) == config
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
    model failing every call (no page), a spool that grows and one that holds steady, spans dropped or
    quarantined on two pods."""
    rule = prometheus_rule(tmp_path, {"errorRate": {"threshold": 0.05, "minCallsPerSecond": 0.1, "for": "10m",
                                                    "severity": "warning"}})
    rules = tmp_path / "rules.yaml"
    rules.write_text(yaml.safe_dump({"groups": rule["spec"]["groups"]}))
    check = subprocess.run([PROMTOOL, "check", "rules", str(rules)], capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "SUCCESS: 3 rules found" in check.stdout, check.stdout + check.stderr

    job = 'namespace="llm", job="t-tagway"'
    call = f'operation="chat", provider="openai"'
    series = [
        (f'tagway_calls_total{{{job}, {call}, model="gpt", status_class="2xx"}}', "0+48x40"),  # 0.8/s ok
        (f'tagway_calls_total{{{job}, {call}, model="gpt", status_class="5xx"}}', "0+12x40"),  # 0.2/s failing
        (f'tagway_call_errors_total{{{job}, {call}, model="gpt", error_type="http_500"}}', "0+12x40"),
        (f'tagway_calls_total{{{job}, {call}, model="rare", status_class="5xx"}}', "0+1x40"),  # 1/min, all fail
        (f'tagway_call_errors_total{{{job}, {call}, model="rare", error_type="timeout"}}', "0+1x40"),
        (f'tagway_spool_spans_pending{{{job}, pod="p1"}}', "0+100x40"),  # growing
        (f'tagway_spool_spans_pending{{{job}, pod="p2"}}', "500x40"),  # steady: ClickHouse is slow, not down
        (f'tagway_spans_dropped_total{{{job}, pod="p1"}}', "0x10 7x30"),
        (f'tagway_spans_quarantined_total{{{job}, pod="p1"}}', "0x40"),
        (f'tagway_spans_dropped_total{{{job}, pod="p2"}}', "0x40"),
        (f'tagway_spans_quarantined_total{{{job}, pod="p2"}}', "0x40"),
    ]
    error_rate = {"exp_labels": {"severity": "warning", "namespace": "llm", "model": "gpt"},
                  "exp_annotations": {
                      "summary": "tagway: gpt fails 20% of its calls",
                      "description": "More than 5% of the calls to model gpt ended in an error for 10m. `tagway "
                                     "errors --where model=gpt --since 1h` shows the error types and example trace "
                                     "ids."}}
    spool = {"exp_labels": {"severity": "warning", "namespace": "llm", "pod": "p1"},
             "exp_annotations": {
                 "summary": "tagway: the spool of p1 keeps growing",
                 "description": "p1 cannot write its spans to ClickHouse and they pile up in its spool (3k spans "
                                "waiting). Its /readyz says why (reason); nothing is lost until the spool "
                                "volume is full."}}
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
            {"eval_time": "20m", "alertname": "TagwayModelErrorRateHigh", "exp_alerts": [error_rate]},
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
