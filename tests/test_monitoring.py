"""The monitoring kit (docs/monitoring.md): the Prometheus alert rules and their unit tests
(promtool), the example scrape configuration, and the Grafana dashboard, checked against the
metrics the daemon exports: every name and label they query must be in the exposition of
`gateway.metrics.Metrics`, so a metric renamed there, or a typo here, fails."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from gateway.metrics import Metrics

ROOT = Path(__file__).resolve().parents[1]
PROMETHEUS = ROOT / "docs" / "prometheus"
ALERTS = PROMETHEUS / "alerts.yml"
ALERTS_TEST = PROMETHEUS / "alerts_test.yml"
DASHBOARD = ROOT / "docs" / "grafana" / "qkd-gateway.json"
COMPOSE_PROMETHEUS = ROOT / "compose" / "prometheus.yml"
#: Labels Prometheus adds to every scraped series; `up` is its own per target.
TARGET_LABELS = frozenset({"job", "instance"})
SCRAPE = {"up": TARGET_LABELS}
#: Grafana's own variables (https://grafana.com/docs/grafana/latest/dashboards/variables/).
GRAFANA_GLOBALS = {"__rate_interval", "__interval", "__range", "__interval_ms", "__range_s",
                   "__range_ms", "__dashboard", "__from", "__to"}


# -- what the daemon exports ------------------------------------------------------------------


def exposition() -> dict[str, frozenset[str]]:
    """Every sample name of the daemon's exposition (counters' `_total`, histograms'
    `_bucket`, `_sum`, `_count`) with its label names: each metric of `Metrics` given one
    label set and a value, rendered by prometheus_client and parsed back."""
    m = Metrics()
    metrics = [v for v in vars(m).values() if isinstance(v, MetricWrapperBase)]
    assert len(metrics) > 20, "Metrics() lost its metrics?"
    for metric in metrics:
        labels = metric._labelnames
        child = metric.labels(*(f"x{i}" for i in range(len(labels)))) if labels else metric
        if isinstance(child, Counter):
            child.inc()
        elif isinstance(child, Gauge):
            child.set(1)
        elif isinstance(child, Histogram):
            child.observe(0.1)
        else:
            raise AssertionError(f"{metric!r}: a kind of metric this test does not know")
    names: dict[str, frozenset[str]] = {}
    text = generate_latest(m.registry).decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            names[str(sample.name)] = frozenset(sample.labels)
    return names


@pytest.fixture(scope="module")
def exported() -> dict[str, frozenset[str]]:
    return {**exposition(), **SCRAPE}


def test_the_exposition_has_every_kind_of_sample(exported: dict[str, frozenset[str]]) -> None:
    """The reference the other checks use: counters with _total, a histogram's series."""
    for name in ("qkdgw_rekeys_total", "qkdgw_audit_write_failures_total",
                 "qkdgw_rekey_latency_seconds_bucket", "qkdgw_rekey_latency_seconds_count",
                 "qkdgw_epoch", "qkdgw_key_has_qkd", "qkdgw_peer_channel_up"):
        assert name in exported
    assert "qkdgw_rekeys" not in exported
    assert exported["qkdgw_rekey_latency_seconds_bucket"] == {"link", "le"}
    assert exported["qkdgw_audit_records"] == set()


# -- the names a PromQL expression reads ------------------------------------------------------

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_RANGE = re.compile(r"\[[^\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")
_TOKEN = re.compile(r"(?<![\w.:])([A-Za-z_:][\w:]*)\s*(\{[^}]*\})?(\s*\()?")
_MATCHER = re.compile(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)")
_KEYWORDS = {"and", "or", "unless", "bool", "offset", "inf", "nan", "group_left",
             "group_right"}


def selectors(expr: str) -> list[tuple[str, set[str]]]:
    """The series selectors of EXPR: (metric name, label names it matches on)."""
    e = _GROUPING.sub(" ", _RANGE.sub(" ", _STRING.sub('""', expr)))
    found = []
    for name, matchers, call in _TOKEN.findall(e):
        if call and not matchers:  # a function or an aggregation
            continue
        if name.lower() in _KEYWORDS:
            continue
        found.append((name, set(_MATCHER.findall(matchers))))
    return found


def unknown(expr: str, exported: dict[str, frozenset[str]]) -> list[str]:
    """What EXPR reads that the exposition does not have: metric names, and labels the metric
    has not (no series would ever match)."""
    problems = []
    names = selectors(expr)
    if not names:
        problems.append(f"{expr!r}: reads no metric")
    for name, labels in names:
        if name not in exported:
            problems.append(f"{name}: no such metric")
        elif labels - exported[name] - TARGET_LABELS:
            problems.append(f"{name}: no label {sorted(labels - exported[name])}")
    return problems


def test_selectors_reads_metric_names_and_their_matchers() -> None:
    expr = ('histogram_quantile(0.99, sum by (instance, link, le) (rate('
            'qkdgw_rekey_latency_seconds_bucket{instance=~"$instance", link=~"a,b"}'
            '[$__rate_interval]))) > 0.8 * on (link) group_left qkdgw_key_age_seconds'
            ' and qkdgw_epoch > 1e3 or vector(0) < +Inf unless up offset 5m')
    assert selectors(expr) == [
        ("qkdgw_rekey_latency_seconds_bucket", {"instance", "link"}),
        ("qkdgw_key_age_seconds", set()), ("qkdgw_epoch", set()), ("up", set())]


@pytest.mark.parametrize(("expr", "problem"), [
    ("qkdgw_blokced == 1", "qkdgw_blokced: no such metric"),
    ("qkdw_blocked == 1", "qkdw_blocked: no such metric"),
    ("increase(qkdgw_audit_write_failures[10m]) > 0",
     "qkdgw_audit_write_failures: no such metric"),
    ("rate(qkdgw_rekey_latency_seconds[5m])", "qkdgw_rekey_latency_seconds: no such metric"),
    ('qkdgw_audit_records{link=~"$link"}', "qkdgw_audit_records: no label ['link']"),
    ('qkdgw_peer_channel_up{link="ab"} == 0', "qkdgw_peer_channel_up: no label ['link']"),
    ("vector(1)", "'vector(1)': reads no metric"),
])
def test_a_wrong_name_or_label_is_caught(exported: dict[str, frozenset[str]], expr: str,
                                         problem: str) -> None:
    """The checks below can fail: a typo, a counter without _total, a histogram without
    _bucket, a label the metric has not."""
    assert problem in unknown(expr, exported)


# -- the alert rules --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def promtool() -> str:
    found = shutil.which("promtool")
    if found is None:
        pytest.skip("promtool is not installed (apt-get install prometheus)")
    return found


def run(*argv: str, cwd: Path = PROMETHEUS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, cwd=cwd, timeout=60,
                          check=False)


def alert_rules(path: Path = ALERTS) -> list[dict[str, Any]]:
    groups = yaml.safe_load(path.read_text())["groups"]
    assert [g["name"] for g in groups] == ["qkd-gateway"]
    rules: list[dict[str, Any]] = groups[0]["rules"]
    return rules


def test_promtool_checks_the_alert_rules(promtool: str) -> None:
    r = run(promtool, "check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout


def test_promtool_runs_the_alert_rules_unit_tests(promtool: str) -> None:
    r = run(promtool, "test", "rules", ALERTS_TEST.name)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_alert_is_unit_tested_firing_and_not_firing() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())
    assert tests["rule_files"] == [ALERTS.name]
    firing: set[str] = set()
    quiet: set[str] = set()
    for test in tests["tests"]:
        for case in test["alert_rule_test"]:
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    alerts = {r["alert"] for r in alert_rules()}
    assert alerts - firing == set(), "alerts with no firing case"
    assert alerts - quiet == set(), "alerts with no case where they stay quiet"
    assert (firing | quiet) - alerts == set(), "tests of alerts that do not exist"


@pytest.mark.parametrize("alert", [r["alert"] for r in alert_rules()])
def test_the_unit_tests_fail_when_an_alert_never_fires(promtool: str, tmp_path: Path,
                                                       alert: str) -> None:
    """Each alert's unit test has teeth: with its expression replaced by one that never
    fires, `promtool test rules` fails."""
    rules = yaml.safe_load(ALERTS.read_text())
    for rule in rules["groups"][0]["rules"]:
        if rule["alert"] == alert:
            rule["expr"] = "vector(1) == 0"
    (tmp_path / ALERTS.name).write_text(yaml.safe_dump(rules, sort_keys=False))
    shutil.copy(ALERTS_TEST, tmp_path)
    r = run(promtool, "test", "rules", ALERTS_TEST.name, cwd=tmp_path)
    assert r.returncode != 0
    assert f"alertname: {alert}," in r.stdout + r.stderr


def test_every_alert_reads_exported_metrics(exported: dict[str, frozenset[str]]) -> None:
    problems = {r["alert"]: unknown(r["expr"], exported) for r in alert_rules()}
    assert {a: p for a, p in problems.items() if p} == {}


def test_the_alerts_cover_the_issue() -> None:
    """An alert on each condition docs/monitoring.md lists."""
    exprs = [" ".join(r["expr"].split()) for r in alert_rules()]
    for wanted in ('up{job="qkd-gateway"} == 0', "qkdgw_blocked == 1",
                   "qkdgw_key_age_seconds > 0.8 * qkdgw_key_hard_lifetime_seconds"
                   " and qkdgw_epoch > 0",
                   "qkdgw_key_has_qkd == 0", "qkdgw_kms_up == 0",
                   "qkdgw_kms_qber > qkdgw_kms_qber_threshold",
                   "qkdgw_kms_pool_dry_in_seconds < 3600",
                   "increase(qkdgw_audit_write_failures_total[10m]) > 0",
                   "qkdgw_peer_channel_up == 0"):
        assert wanted in exprs


def test_every_alert_has_a_severity_and_names_what_failed(
        exported: dict[str, frozenset[str]]) -> None:
    for rule in alert_rules():
        assert rule["labels"]["severity"] in {"critical", "warning"}, rule["alert"]
        notes = rule["annotations"]
        assert set(notes) >= {"summary", "description"}, rule["alert"]
        labels = {"link", "peer"}  # those every metric it reads has
        for name, _ in selectors(rule["expr"]):
            labels &= exported.get(name, frozenset())  # (a name not exported: above)
        # The series' own label (link, peer) names it; those of the whole gateway, its target.
        for label in labels or {"instance"}:
            assert f"$labels.{label}" in notes["summary"], (rule["alert"], label)
        for label in labels:
            assert f"$labels.{label}" in notes["description"], (rule["alert"], label)


def test_alerts_docs_list_every_alert() -> None:
    doc = (ROOT / "docs" / "monitoring.md").read_text()
    rows = set(re.findall(r"^\| `(\w+)` \|", doc, flags=re.M))
    assert rows == {r["alert"] for r in alert_rules()}


# -- the scrape configurations ----------------------------------------------------------------


def test_promtool_checks_the_example_scrape_config(promtool: str) -> None:
    r = run(promtool, "check", "config", "prometheus.yml")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    assert [j["job_name"] for j in config["scrape_configs"]] == ["qkd-gateway"]


def test_promtool_checks_the_compose_demos_scrape_config(promtool: str, tmp_path: Path) -> None:
    """As in the image: compose/prometheus.yml with alerts.yml beside it, in /etc/qkdgw."""
    shutil.copy(COMPOSE_PROMETHEUS, tmp_path / "prometheus.yml")
    shutil.copy(ALERTS, tmp_path)
    r = run(promtool, "check", "config", "prometheus.yml", cwd=tmp_path)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 1 rule files found" in r.stdout


# -- the Grafana dashboard --------------------------------------------------------------------

#: The panels docs/monitoring.md promises.
PANELS = ["Links blocked", "PQC-only links", "Epoch per link", "Key age vs hard lifetime",
          "Rekey rate", "Rekey failures by cause", "Rekey latency p50 / p99",
          "KMS pool (stored keys)", "Key rate", "QBER vs threshold", "KMS up",
          "Peer channel up", "Alarms", "Audit trail"]
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}


@pytest.fixture(scope="module")
def dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, those in collapsed rows too."""
    for panel in dashboard["panels"]:
        yield panel
        yield from panel.get("panels", [])


def targets(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for panel in panels(dashboard):
        for target in panel.get("targets", []):
            yield panel["title"], target["expr"]


def test_the_dashboard_is_a_grafana_dashboard(dashboard: dict[str, Any]) -> None:
    for key in ("title", "uid", "schemaVersion", "panels", "templating", "time", "version",
                "editable", "refresh", "tags", "annotations"):
        assert key in dashboard, key
    assert dashboard["title"] == "qkd-gateway"
    assert re.fullmatch(r"[\w-]{1,40}", dashboard["uid"])
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["id"] is None  # an import gets a new one


def test_the_dashboard_has_a_datasource_and_link_variable(dashboard: dict[str, Any]) -> None:
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    link = variables["link"]
    assert link["type"] == "query"
    assert link["datasource"] == DATASOURCE
    assert link["definition"] == link["query"]["query"] == "label_values(qkdgw_epoch, link)"
    used = {v for _, expr in targets(dashboard) for v in re.findall(r"\$\{?(\w+)", expr)}
    assert used - GRAFANA_GLOBALS - set(variables) == set(), "undefined variables"
    assert {"link", "instance"} <= used


def test_every_panel_has_a_place_a_datasource_and_queries(dashboard: dict[str, Any]) -> None:
    ids = [p["id"] for p in panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids repeat"
    cells: dict[tuple[int, int], str] = {}
    for panel in panels(dashboard):
        g = panel["gridPos"]
        assert all(isinstance(g[k], int) for k in "xywh"), panel["title"]
        assert g["w"] >= 1, panel["title"]
        assert g["h"] >= 1, panel["title"]
        assert 0 <= g["x"] <= g["x"] + g["w"] <= 24, panel["title"]
        for x in range(g["x"], g["x"] + g["w"]):
            for y in range(g["y"], g["y"] + g["h"]):
                assert (x, y) not in cells, f"{panel['title']} overlaps {cells[x, y]}"
                cells[x, y] = panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["type"] in {"stat", "timeseries", "state-timeline", "table", "gauge",
                                 "bargauge"}, panel["title"]
        assert panel["datasource"] == DATASOURCE, panel["title"]
        assert panel["targets"], panel["title"]
        refs = [t["refId"] for t in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]
        for t in panel["targets"]:
            assert t["datasource"] == DATASOURCE, panel["title"]
            assert t["expr"].strip(), panel["title"]
    titles = [p["title"] for p in panels(dashboard)]
    assert [t for t in PANELS if t not in titles] == []


def test_every_dashboard_query_reads_exported_metrics(
        dashboard: dict[str, Any], exported: dict[str, frozenset[str]]) -> None:
    problems = {f"{title}: {expr}": unknown(expr, exported)
                for title, expr in targets(dashboard)}
    assert {q: p for q, p in problems.items() if p} == {}
    variables = [v["query"]["query"] for v in dashboard["templating"]["list"]
                 if v["type"] == "query"]
    for query in variables:
        m = re.fullmatch(r"label_values\((\w+), (\w+)\)", query)
        assert m, query
        assert m[1] in exported, query
        assert m[2] in exported[m[1]] | TARGET_LABELS, query


def test_every_dashboard_query_is_promql(promtool: str, dashboard: dict[str, Any],
                                         tmp_path: Path) -> None:
    """Each query, Grafana's variables filled in as Grafana would, parses: promtool checks
    them as recording rules."""
    rules = []
    for i, (title, expr) in enumerate(targets(dashboard)):
        filled = expr.replace("$__rate_interval", "1m")
        filled = re.sub(r"\$\{?\w+\}?", ".*", filled)
        rules.append({"record": f"dashboard:query_{i}", "expr": filled,
                      "labels": {"panel": title}})
    path = tmp_path / "dashboard.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run(promtool, "check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout
