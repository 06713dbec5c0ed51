"""Offline checks of the monitoring artefacts: Grafana dashboards, Prometheus rules, metric names.

- Every dashboard type-checks against `@grafana/schema` (each panel's options against its panel
  plugin's own types, each query as a Prometheus query on the datasource uid `prometheus`).
- Every PromQL expression in dashboards and rules parses (`promtool check rules`, with the
  dashboards' template variables substituted first); `promtool check config` loads the rules;
  `promtool test rules` passes, and the tests make every alert fire and stay quiet at least once.
- Every metric a dashboard or rule reads is exported by the code's registry, or recorded by a rule.
- The registry itself follows Prometheus conventions (`promtool check metrics`, `dpe_` prefix,
  snake_case) and has bounded label sets (no ids, versions or free text as labels).

Tools come from `.ci/install-tools`: tsc and @grafana/schema in .cache/npm, promtool on PATH.
A missing tool fails the test; nothing is skipped.
"""

from __future__ import annotations

import importlib
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from string import Template
from typing import Any

import psutil
import pytest
import yaml
from monitoring_queries import (
    DASHBOARDS,
    RANGE_BUILTINS,
    ROOT,
    RULES,
    alerting_rules,
    all_panels,
    all_queries,
    dashboard_queries,
    load_dashboards,
    recording_rules,
    substitute,
)
from prometheus_client import REGISTRY, CollectorRegistry, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.metrics_core import Metric
from prometheus_server import require_tool

RULE_TESTS = ROOT / "monitoring/prometheus/tests"
PROMETHEUS_CONFIG = ROOT / "monitoring/prometheus/prometheus.yml"
NPM_MODULES = ROOT / ".cache/npm/node_modules"
METRIC_PACKAGES = ("monitoring", "dpe", "streams", "consumers", "producers", "trainer")

DATASOURCE = {"type": "prometheus", "uid": "prometheus"}
SEVERITIES = {"critical", "warning"}
PROMETHEUS_OWN_SERIES = {"up"}
"""Series Prometheus makes itself for every target, usable without any registry entry."""

PANEL_TYPES = {
    "bargauge": ("BarGauge", "{}"),
    "stat": ("Stat", "{}"),
    "text": ("Text", "{}"),
    "timeseries": ("TimeSeries", "timeseries.FieldConfig"),
}
"""Panel plugin id -> (type-file prefix, custom field config type) of its types in @grafana/schema."""
PANEL_TYPES_MODULE = "@grafana/schema/dist/esm/raw/composable/{kind}/panelcfg/x/{prefix}PanelCfg_types.gen"

TS_MODULE = Template("""\
import type { AnnotationQuery, DataQuery, Dashboard, Panel, RowPanel } from '@grafana/schema';
$imports

/** A type as JSON spells it: Grafana's TypeScript string enums by their values. */
type Json<T> = T extends string ? `$${T}` : T extends readonly (infer U)[] ? Json<U>[]
  : T extends object ? { [K in keyof T]: Json<T[K]> } : T;

/** A query of the Prometheus data source provisioned with uid "prometheus". */
type PromQuery = Omit<DataQuery, 'datasource'> & {
  datasource: { type: 'prometheus'; uid: 'prometheus' };
  expr: string;
  legendFormat?: string;
  range?: boolean;
  instant?: boolean;
  interval?: string;
  format?: 'time_series' | 'table' | 'heatmap';
  editorMode?: 'code' | 'builder';
};

/** A panel whose options and custom field config are checked against its plugin's types. */
type PanelOf<Kind extends string, Options, Custom> =
  Json<Omit<Panel<unknown, Custom>, 'type' | 'options' | 'targets'>>
  & { type: Kind; options: Json<Options>; targets?: PromQuery[] };

/** An annotation from a Prometheus query, with the Prometheus plugin's formatting fields. */
type PromAnnotation = Json<Omit<AnnotationQuery<PromQuery>, 'target'>>
  & { target: PromQuery; titleFormat?: string; textFormat?: string; tagKeys?: string; useValueForTime?: boolean };

type DpePanel = $panel_union | Json<RowPanel>;
type DpeDashboard = Json<Omit<Dashboard, 'panels' | 'annotations'>>
  & { panels: DpePanel[]; annotations?: { list: PromAnnotation[] } };

const dashboard: DpeDashboard = $dashboard;
const asDashboard: Json<Dashboard> = dashboard;
export default asDashboard;
""")
"""One dashboard as a TypeScript module: the JSON assigned to @grafana/schema's Dashboard type."""


# --- loading -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dashboards() -> dict[str, dict[str, Any]]:
    found = load_dashboards()
    assert found, f"no dashboards in {DASHBOARDS}"
    return found


# --- PromQL: template variables and metric names ---------------------------------------------------

STRING_LITERAL = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
LABEL_MATCHERS = re.compile(r"\{[^{}]*\}")
RANGE_OR_SUBQUERY = re.compile(r"\[[^\[\]]*\]")
LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
FUNCTION_CALL = re.compile(r"\b[a-zA-Z_]\w*\s*\(")
IDENTIFIER = re.compile(r"(?<![\w:.])[a-zA-Z_:][\w:]*")
PROMQL_KEYWORDS = {
    "and", "or", "unless", "atan2", "bool", "offset", "by", "without", "on", "ignoring", "group_left", "group_right",
    "inf", "nan",
}


def metric_names(expr: str) -> set[str]:
    """Metric (and recording rule) names a PromQL expression reads.

    Strips what can hold other identifiers (strings, label matchers, ranges, label lists,
    function names, keywords); what is left are series names.
    """
    text = STRING_LITERAL.sub('""', expr)
    text = LABEL_MATCHERS.sub("{}", text)
    text = RANGE_OR_SUBQUERY.sub("[]", text)
    text = LABEL_LIST.sub(" ", text)
    text = FUNCTION_CALL.sub("(", text)
    return {name for name in IDENTIFIER.findall(text) if name.lower() not in PROMQL_KEYWORDS}


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ("up", {"up"}),
        ('sum by (capability) (rate(dpe_x_total{topic=~"a.b", job="w"}[5m]))', {"dpe_x_total"}),
        ("dpe:y:rate5m offset 1h > on (topic) group_left (stage) 0.5 * dpe_z", {"dpe:y:rate5m", "dpe_z"}),
        ("max_over_time(dpe_a[1h:1m]) - ignoring(le) dpe_b @ end() > bool 1e-3", {"dpe_a", "dpe_b"}),
        ("histogram_quantile(0.9, sum without (instance) (rate(dpe_s_bucket[$__rate_interval])))", {"dpe_s_bucket"}),
        ('label_replace(dpe_c, "x", "$1", "y", "(and|or)") atan2 dpe_d', {"dpe_c", "dpe_d"}),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_template_variables_are_substituted() -> None:
    values = {"capability": ".+", "window": "1h", **RANGE_BUILTINS}
    expr = 'rate(x{capability=~"$capability"}[$__rate_interval]) / avg_over_time(y[${window}]) [[capability]]'
    assert substitute(expr, values) == 'rate(x{capability=~".+"}[20s]) / avg_over_time(y[1h]) .+'
    with pytest.raises(AssertionError, match="undefined template variable"):
        substitute("x{a=~'$nope'}", values)


# --- dashboards ----------------------------------------------------------------------------------


def typescript_for(dashboard: dict[str, Any]) -> str:
    """A TypeScript module that assigns `dashboard` to @grafana/schema's Dashboard type."""
    imports = "\n".join(
        f"import type * as {kind} from '{PANEL_TYPES_MODULE.format(kind=kind, prefix=prefix)}';"
        for kind, (prefix, _) in PANEL_TYPES.items()
    )
    union = " | ".join(f"PanelOf<'{kind}', {kind}.Options, {custom}>" for kind, (_, custom) in PANEL_TYPES.items())
    return TS_MODULE.substitute(imports=imports, panel_union=union, dashboard=json.dumps(dashboard, indent=2))


def type_check(dashboards: dict[str, dict[str, Any]], workdir: Path) -> subprocess.CompletedProcess[str]:
    """Run `tsc --noEmit --strict` over one generated .ts file per dashboard in `workdir`."""
    tsc = require_tool("DPE_TSC", str(NPM_MODULES / ".bin/tsc"))
    (workdir / "node_modules").symlink_to(NPM_MODULES)
    for name, dashboard in dashboards.items():
        (workdir / f"{name}.ts").write_text(typescript_for(dashboard))
    return subprocess.run(
        [tsc, "--noEmit", "--strict", "--skipLibCheck", "--module", "nodenext", "--moduleResolution", "nodenext",
         *(f"{name}.ts" for name in dashboards)],
        cwd=workdir, capture_output=True, text=True, timeout=120,
    )


def test_dashboards_type_check_against_grafana_schema(dashboards: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    result = type_check(dashboards, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_type_check_catches_a_misspelt_option(tmp_path: Path) -> None:
    panel = {"type": "text", "options": {"mode": "html", "contnet": ""}}
    broken = {"schemaVersion": 42, "title": "x", "panels": [panel]}
    result = type_check({"broken": broken}, tmp_path)
    assert result.returncode != 0 and "contnet" in result.stdout, result.stdout + result.stderr


def test_dashboards_use_the_schema_version_of_grafana_schema(dashboards: dict[str, dict[str, Any]]) -> None:
    node = require_tool("DPE_NODE", "node")
    result = subprocess.run(
        [node, "-p", f"require({json.dumps(str(NPM_MODULES / '@grafana/schema'))}).defaultDashboard.schemaVersion"],
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr
    expected = int(result.stdout)
    assert {name: d["schemaVersion"] for name, d in dashboards.items()} == dict.fromkeys(dashboards, expected)


def datasources(node: Any) -> Iterator[Any]:
    """Every value of a "datasource" key anywhere in a JSON document."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key == "datasource":
                yield value
            yield from datasources(value)
    elif isinstance(node, list):
        for item in node:
            yield from datasources(item)


def test_dashboards_query_only_the_provisioned_prometheus(dashboards: dict[str, dict[str, Any]]) -> None:
    for name, dashboard in dashboards.items():
        used = list(datasources(dashboard))
        assert used, name
        assert all(source == DATASOURCE for source in used), f"{name}: {used}"


def test_dashboards_have_unique_uids_and_titles_and_link_each_other(dashboards: dict[str, dict[str, Any]]) -> None:
    uids = [d["uid"] for d in dashboards.values()]
    titles = [d["title"] for d in dashboards.values()]
    assert len(set(uids)) == len(uids) and len(set(titles)) == len(titles)
    for name, dashboard in dashboards.items():
        assert dashboard.get("id") is None, f"{name}: a provisioned dashboard carries no instance id"
        assert "dpe-stream" in dashboard["tags"], f"{name}: the dashboard links find dashboards by the dpe-stream tag"
        assert [link["tags"] for link in dashboard["links"]] == [["dpe-stream"]], name


def test_panels_have_unique_ids_and_do_not_overlap(dashboards: dict[str, dict[str, Any]]) -> None:
    for name, dashboard in dashboards.items():
        panels = list(all_panels(dashboard))
        ids = [panel["id"] for panel in panels]
        assert len(set(ids)) == len(ids), f"{name}: duplicate panel ids"
        cells: dict[tuple[int, int], int] = {}
        for panel in panels:
            pos = panel["gridPos"]
            assert pos["x"] + pos["w"] <= 24, f"{name}: panel {panel['id']} is wider than the grid"
            for x in range(pos["x"], pos["x"] + pos["w"]):
                for y in range(pos["y"], pos["y"] + pos["h"]):
                    other = cells.setdefault((x, y), panel["id"])
                    assert other == panel["id"], f"{name}: panels {other} and {panel['id']} overlap"


def test_data_panels_have_titles_units_and_queries(dashboards: dict[str, dict[str, Any]]) -> None:
    for name, dashboard in dashboards.items():
        for panel in all_panels(dashboard):
            assert panel.get("title"), f"{name}: panel {panel['id']} has no title"
            if panel["type"] in {"row", "text"}:
                continue
            assert panel.get("description"), f"{name}: {panel['title']} has no description"
            assert panel["targets"], f"{name}: {panel['title']} has no query"
            assert panel["fieldConfig"]["defaults"].get("unit"), f"{name}: {panel['title']} has no unit"


def test_template_variables_are_defined_and_used(dashboards: dict[str, dict[str, Any]]) -> None:
    for name, dashboard in dashboards.items():
        dashboard_queries(dashboard)  # substitution fails on an undefined variable
        text = json.dumps(dashboard.get("panels", []))
        for variable in dashboard.get("templating", {}).get("list", []):
            assert variable.get("datasource", DATASOURCE) == DATASOURCE, f"{name}: ${variable['name']}"
            assert re.search(rf"\$\{{?{variable['name']}\b", text), f"{name}: ${variable['name']} is never used"


# --- PromQL parses -------------------------------------------------------------------------------


def promtool() -> str:
    return require_tool("DPE_PROMTOOL", "promtool")


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120)


def test_dashboard_queries_parse(dashboards: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    groups = [
        {"name": name, "rules": [{"record": record, "expr": query.expr} for record, query in dashboard_queries(d).items()]}
        for name, d in dashboards.items()
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": groups}))
    result = run_promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_pass_promtool_check() -> None:
    files = sorted(RULES.glob("*.yml"))
    assert files, f"no rules in {RULES}"
    result = run_promtool("check", "rules", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_config_loads_the_rules() -> None:
    result = run_promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert result.returncode == 0, result.stdout + result.stderr
    for path in RULES.glob("*.yml"):
        assert path.name in result.stdout, f"prometheus.yml does not load {path.name}:\n{result.stdout}"


def test_rule_unit_tests_pass() -> None:
    files = sorted(RULE_TESTS.glob("*.yml"))
    assert files, f"no rule tests in {RULE_TESTS}"
    result = run_promtool("test", "rules", *map(str, files))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_is_tested_firing_and_quiet() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for path in RULE_TESTS.glob("*.yml"):
        for case in yaml.safe_load(path.read_text())["tests"]:
            for check in case.get("alert_rule_test", []):
                (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    alerts = {rule["alert"] for rule in alerting_rules()}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - quiet == set(), "alerts never tested staying quiet"
    assert (firing | quiet) - alerts == set(), "tests name alerts that do not exist"


def test_alerts_wait_and_say_what_to_do() -> None:
    for rule in alerting_rules():
        name = rule["alert"]
        assert re.fullmatch(r"Dpe[A-Z]\w+", name), name
        assert rule.get("for"), f"{name} has no `for:`"
        assert rule["labels"]["severity"] in SEVERITIES, name
        assert {"summary", "description"} <= set(rule["annotations"]), name


def test_recording_rules_follow_the_naming_convention_and_are_used(dashboards: dict[str, dict[str, Any]]) -> None:
    used = set().union(*map(metric_names, all_queries(dashboards).values()))
    for rule in recording_rules():
        assert re.fullmatch(r"[a-z_]+:[a-z0-9_]+:[a-z0-9_]+", rule["record"]), f"{rule['record']}: level:metric:ops"
        assert rule["record"] in used, f"recording rule {rule['record']} is used by no dashboard or alert"


# --- metric names against the registry ------------------------------------------------------------


def import_metric_modules() -> None:
    """Import every project module that creates Prometheus metrics, so REGISTRY holds them all."""
    for package in METRIC_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            if "prometheus_client" in path.read_text():
                module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
                importlib.import_module(module.removesuffix(".__init__"))


SAMPLE_SUFFIXES = {
    "counter": ("_total", "_created"),
    "gauge": ("",),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
    "summary": ("", "_sum", "_count", "_created"),
    "info": ("_info",),
    "stateset": ("",),
    "gaugehistogram": ("_bucket", "_gsum", "_gcount"),
    "unknown": ("",),
}
"""Sample names a metric family of each type exposes, as suffixes of the family name."""


def exported_series() -> set[str]:
    """Every series name the registry can expose (families without children included)."""
    import_metric_modules()
    return {described.name + suffix for described in REGISTRY.collect() for suffix in SAMPLE_SUFFIXES[described.type]}


def test_dashboards_and_rules_read_only_exported_metrics(dashboards: dict[str, dict[str, Any]]) -> None:
    known = exported_series() | PROMETHEUS_OWN_SERIES | {rule["record"] for rule in recording_rules()}
    unknown = {where: sorted(metric_names(expr) - known) for where, expr in all_queries(dashboards).items()}
    assert {where: names for where, names in unknown.items() if names} == {}, "read but exported by no registry"


# --- registry conventions ------------------------------------------------------------------------

UNBOUNDED_LABEL = re.compile(
    r"(^|_)(id|ids|uuid|key|offset|uri|url|path|message|detail|text|question|answer|version|round|step|seq|ts"
    r"|timestamp|hash|sha256)$"
)


def dpe_metrics() -> list[MetricWrapperBase]:
    """The metric objects the project defines (module globals of the metric modules)."""
    import_metric_modules()
    found = {
        id(value): value
        for name, module in list(sys.modules.items())
        if name.split(".")[0] in METRIC_PACKAGES
        for value in vars(module).values()
        if isinstance(value, MetricWrapperBase)
    }
    return list(found.values())


def label_names(metric: MetricWrapperBase) -> tuple[str, ...]:
    """A metric's label names (prometheus_client has no public accessor for those of a parent)."""
    return tuple(metric._labelnames)


def family(metric: MetricWrapperBase) -> Metric:
    """A metric's family description: name (a counter's without `_total`), type and help."""
    [described] = metric.describe()
    return described


@dataclass(eq=False)
class OneSampleEach:
    """A collector exposing every given metric with one zero sample (labels set to "x")."""

    metrics: list[MetricWrapperBase]

    def collect(self) -> Iterator[Metric]:
        for metric in self.metrics:
            described = family(metric)
            copy = Metric(described.name, described.documentation, described.type)
            labels = dict.fromkeys(label_names(metric), "x")
            for suffix in SAMPLE_SUFFIXES[described.type]:
                bucket = {"le": "+Inf"} if suffix == "_bucket" else {}
                copy.add_sample(described.name + suffix, {**labels, **bucket}, 0)
            yield copy


def exposition(metrics: list[MetricWrapperBase]) -> str:
    """Text exposition of `metrics` with a sample each, so that promtool lints every family."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(OneSampleEach(metrics))
    return generate_latest(registry).decode()


def test_every_registered_dpe_metric_is_a_module_level_metric() -> None:
    defined = {family(metric).name for metric in dpe_metrics()}
    registered = {described.name for described in REGISTRY.collect() if described.name.startswith("dpe_")}
    assert registered - defined == set(), "metrics created outside a module global cannot be checked here"


def test_metric_names_follow_prometheus_conventions() -> None:
    metrics = dpe_metrics()
    assert metrics
    for metric in metrics:
        described = family(metric)
        assert re.fullmatch(r"dpe_[a-z][a-z0-9]*(_[a-z0-9]+)*", described.name), f"{described.name}: dpe_ snake_case"
        assert described.documentation.strip(), f"{described.name} has no help text"
    result = subprocess.run(
        [promtool(), "check", "metrics"], input=exposition(metrics), capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_convention_check_catches_a_bad_name() -> None:
    result = subprocess.run(
        [promtool(), "check", "metrics"],
        input="# HELP dpe_step_milliseconds h\n# TYPE dpe_step_milliseconds gauge\ndpe_step_milliseconds 1\n",
        capture_output=True, text=True, timeout=60,
    )
    assert result.returncode != 0 and "seconds" in result.stdout + result.stderr


def test_label_sets_are_bounded() -> None:
    for metric in dpe_metrics():
        name, labels = family(metric).name, label_names(metric)
        assert len(labels) <= 4, f"{name}: {labels}"
        unbounded = [label for label in labels if UNBOUNDED_LABEL.search(label)]
        assert unbounded == [], f"{name}: labels {unbounded} grow without bound"


def test_metrics_listen_on_loopback_unless_told_otherwise() -> None:
    from dpe.broker import free_port
    from monitoring.metrics import serve_metrics

    port = free_port()
    serve_metrics(port)
    listening = [c.laddr.ip for c in psutil.Process().net_connections("inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening == ["127.0.0.1"]
