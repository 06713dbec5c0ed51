"""Every PromQL query of dpe-stream's monitoring, written out the way Grafana and Prometheus run it.

The dashboards' panel, annotation and template-variable queries with Grafana's variables filled
in (stand-ins, or the values a live Prometheus offers), and the rules' expressions. The offline
checks (test_monitoring.py: every query parses and reads exported metrics) and the live one
(test_prometheus_scrape.py: every query has series after a short run) share them.

Example:
    >>> queries = dashboard_queries(load_dashboards()["dpe-spiral"])
    >>> queries["variable_capability"].expr
    'dpe_weakness_error_rate'
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
DASHBOARDS = ROOT / "monitoring/grafana/dashboards"
RULES = ROOT / "monitoring/prometheus/rules"
DATASOURCE_PROVISIONING = ROOT / "monitoring/grafana/provisioning/datasources/prometheus.yml"

MAX_DATA_POINTS = 1000
"""Points Grafana asks of a range query: about one per pixel of a wide panel."""


# --- loading -------------------------------------------------------------------------------------


def load_dashboards() -> dict[str, dict[str, Any]]:
    """Dashboard file stem -> parsed JSON."""
    return {path.stem: json.loads(path.read_text()) for path in sorted(DASHBOARDS.glob("*.json"))}


def load_rule_groups() -> list[dict[str, Any]]:
    """Every rule group of every rules file."""
    return [group for path in sorted(RULES.glob("*.yml")) for group in yaml.safe_load(path.read_text())["groups"]]


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Top-level panels and the panels inside (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def alerting_rules() -> list[dict[str, Any]]:
    return [rule for group in load_rule_groups() for rule in group["rules"] if "alert" in rule]


def recording_rules() -> list[dict[str, Any]]:
    return [rule for group in load_rule_groups() for rule in group["rules"] if "record" in rule]


# --- Grafana's variables -------------------------------------------------------------------------

DURATION_PART = re.compile(r"(\d+)(ms|s|m|h|d|w|y)")
UNIT_SECONDS = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800, "y": 31536000}


def duration_seconds(duration: str) -> float:
    """Seconds of a Prometheus duration.

    >>> duration_seconds("1h30m"), duration_seconds("250ms")
    (5400.0, 0.25)
    """
    parts = DURATION_PART.findall(duration)
    assert parts and "".join(number + unit for number, unit in parts) == duration, f"not a duration: {duration!r}"
    return float(sum(int(number) * UNIT_SECONDS[unit] for number, unit in parts))


@functools.cache
def scrape_interval_s() -> float:
    """The scrape interval Grafana is told of (the provisioned data source's `timeInterval`)."""
    [source] = yaml.safe_load(DATASOURCE_PROVISIONING.read_text())["datasources"]
    return duration_seconds(source["jsonData"]["timeInterval"])


def grafana_builtins(range_s: float, scrape_s: float) -> dict[str, str]:
    """Grafana's built-in variables for a dashboard time range of `range_s` seconds.

    $__interval is the range over MAX_DATA_POINTS, at least the scrape interval `scrape_s` (Grafana
    also rounds it to a tidy value); $__rate_interval is Grafana's max($__interval + scrape, 4 scrapes).

    >>> grafana_builtins(3600, 5)["__rate_interval"], grafana_builtins(7 * 86400, 5)["__rate_interval"]
    ('20s', '610s')
    """
    interval = max(math.ceil(scrape_s), math.ceil(range_s / MAX_DATA_POINTS))
    rate_interval = max(interval + math.ceil(scrape_s), 4 * math.ceil(scrape_s))
    seconds = round(range_s)
    return {
        "__interval": f"{interval}s", "__interval_ms": str(interval * 1000), "__rate_interval": f"{rate_interval}s",
        "__range": f"{seconds}s", "__range_s": str(seconds), "__range_ms": str(seconds * 1000),
    }


RANGE_BUILTINS = grafana_builtins(3600, scrape_interval_s())
"""The built-in variables of a dashboard showing the last hour: stand-ins for the offline checks."""

VARIABLE_REF = re.compile(r"\$(\w+)|\$\{(\w+)(?::[^}]*)?\}|\[\[(\w+)(?::\w+)?\]\]")
LABEL_VALUES = re.compile(r"^label_values\((?:(?P<selector>.+),)?\s*(?P<label>\w+)\s*\)$", re.DOTALL)
GRAFANA_REGEX_SPECIALS = re.compile(r"[$^*{}\[\]'+?.()|]")


def variable_values(dashboard: dict[str, Any]) -> dict[str, str]:
    """A stand-in value for each template variable: a label-value regex, or an interval's first option."""
    values = dict(RANGE_BUILTINS)
    for variable in dashboard.get("templating", {}).get("list", []):
        kind = variable["type"]
        if kind == "query":
            values[variable["name"]] = ".+"
        elif kind == "interval":
            values[variable["name"]] = variable["query"].split(",")[0].strip()
        else:
            raise AssertionError(f"variable {variable['name']}: type {kind} has no stand-in value here")
    return values


def label_values_query(variable: dict[str, Any]) -> tuple[str, str]:
    """The PromQL selector and the label behind a `label_values(selector, label)` query variable."""
    query = variable["query"]
    text = query["query"] if isinstance(query, dict) else query
    match = LABEL_VALUES.match(text.strip())
    assert match and match["selector"], f"variable {variable['name']}: use label_values(selector, label): {text!r}"
    return match["selector"].strip(), match["label"]


def grafana_regex(values: Sequence[str]) -> str:
    """Values of a multi-value variable as Grafana writes them into PromQL: regex-escaped, `(a|b)` for several.

    >>> print(grafana_regex(["dpe.unlabeled"]), grafana_regex(["colour", "ocr"]))
    dpe\\\\.unlabeled (colour|ocr)
    """
    escaped = [GRAFANA_REGEX_SPECIALS.sub(r"\\\\\g<0>", value.replace("\\", "\\\\\\\\")) for value in values]
    return escaped[0] if len(escaped) == 1 else f"({'|'.join(escaped)})"


def selected_values(dashboard: dict[str, Any], options: Mapping[str, Sequence[str]],
                    builtins: Mapping[str, str]) -> dict[str, str]:
    """Each variable as the dashboard opens: an interval's saved value, a query variable's "All".

    "All" is the variable's `allValue` where it has one, else every one of its `options`.
    """
    values = dict(builtins)
    for variable in dashboard.get("templating", {}).get("list", []):
        name, current = variable["name"], variable["current"]["value"]
        if variable["type"] == "interval":
            values[name] = current
        else:
            assert current in ("$__all", ["$__all"]), f"${name} opens on {current!r}; only All is filled in here"
            values[name] = variable.get("allValue") or grafana_regex(options[name])
    return values


def substitute(expr: str, values: Mapping[str, str]) -> str:
    """`expr` with every Grafana variable reference ($x, ${x}, ${x:fmt}, [[x]]) replaced by its value."""

    def value(match: re.Match[str]) -> str:
        name = next(group for group in match.groups() if group)
        assert name in values, f"undefined template variable ${name} in {expr!r}"
        return values[name]

    return VARIABLE_REF.sub(value, expr)


# --- the queries ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Query:
    """One PromQL query as Grafana sends it: instant (at the range's end), or over the range with points
    at least `min_step` apart (a target's `interval`)."""

    expr: str
    instant: bool = False
    min_step: str = "0s"


def target_query(target: dict[str, Any], values: Mapping[str, str]) -> Query:
    """The query of one panel or annotation target, its variables filled with `values`."""
    return Query(substitute(target["expr"], values), bool(target.get("instant")), target.get("interval") or "0s")


def panel_scopes(panel: dict[str, Any], values: Mapping[str, str],
                 repeats: Mapping[str, Sequence[str]]) -> list[Mapping[str, str]]:
    """The variable values of each copy of `panel`: one copy per value of the variable it repeats over."""
    variable = panel.get("repeat")
    if variable not in repeats:
        return [values]
    return [{**values, variable: grafana_regex([value])} for value in repeats[variable]]


def dashboard_queries(dashboard: dict[str, Any], values: Mapping[str, str] | None = None,
                      repeats: Mapping[str, Sequence[str]] | None = None) -> dict[str, Query]:
    """Recording-rule-safe name -> query of every panel, annotation and variable query.

    Variables are filled with `values` (stand-ins by default); a panel repeated over a variable with
    values in `repeats` has one query per value (`panel_<id>_<refId>_<n>`).
    """
    values = values if values is not None else variable_values(dashboard)
    queries = {}
    for panel in all_panels(dashboard):
        scopes = panel_scopes(panel, values, repeats or {})
        for number, scope in enumerate(scopes):
            suffix = f"_{number}" if len(scopes) > 1 else ""
            for target in panel.get("targets", []):
                queries[f"panel_{panel['id']}_{target['refId']}{suffix}"] = target_query(target, scope)
    for number, annotation in enumerate(dashboard.get("annotations", {}).get("list", [])):
        queries[f"annotation_{number}"] = target_query(annotation["target"], values)
    for variable in dashboard.get("templating", {}).get("list", []):
        if variable["type"] == "query":
            queries[f"variable_{variable['name']}"] = Query(label_values_query(variable)[0])
    return queries


def rule_queries() -> dict[str, str]:
    """Rule name -> expression of every alerting and recording rule."""
    return {rule.get("alert") or rule["record"]: rule["expr"] for rule in alerting_rules() + recording_rules()}


def all_queries(dashboards: dict[str, dict[str, Any]]) -> dict[str, str]:
    """Where -> PromQL of every query in the dashboards and the rules."""
    queries = {f"rules: {name}": expr for name, expr in rule_queries().items()}
    for name, dashboard in dashboards.items():
        queries |= {f"{name}: {where}": query.expr for where, query in dashboard_queries(dashboard).items()}
    return queries


# --- PromQL text ---------------------------------------------------------------------------------

SET_OPERATOR = re.compile(r"\b(?:and|or|unless)\b(?:\s*(?:on|ignoring)\s*\(\s*\))?")
COMPARISON = re.compile(r"==|!=|>=|<=|>|<")
OFFSET = re.compile(r"\boffset\s+((?:\d+(?:ms|s|m|h|d|w|y))+)")


def outer_level(expr: str) -> str:
    """`expr` with what lies inside brackets or string literals blanked out, every position kept.

    >>> outer_level('sum by (job) (x{a="b"}) > 1')
    'sum by (   ) (        ) > 1'
    """
    out, depth, quote, escaped = [], 0, "", False
    for char in expr:
        if quote:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == quote:
                quote = ""
            out.append(" ")
        elif char in "\"'`":
            quote = char
            out.append(" ")
        elif char in "([{":
            depth += 1
            out.append(char if depth == 1 else " ")
        elif char in ")]}":
            out.append(char if depth == 1 else " ")
            depth -= 1
        else:
            out.append(char if depth == 0 else " ")
    return "".join(out)


def unwrapped(expr: str) -> str:
    """`expr` without the parentheses that enclose all of it.

    >>> unwrapped(" ((a > 1)) "), unwrapped("(a) + (b)")
    ('a > 1', '(a) + (b)')
    """
    text = expr.strip()
    while re.fullmatch(r"\(\s*\)", outer_level(text)):
        text = text[1:-1].strip()
    return text


def measured_quantities(expr: str) -> list[str]:
    """What an alert measures: each condition joined by and/or/unless, without its threshold comparison.

    An alert is legitimately empty while it does not fire; what it compares with its thresholds
    is not, if the metrics it reads exist.

    >>> measured_quantities('up{job=~"a|b"} == 0')
    ['up{job=~"a|b"}']
    >>> measured_quantities('(x - x offset 30m > 0.05) and on () (max(changes(y[30m])) > 0)')
    ['x - x offset 30m', 'max(changes(y[30m]))']
    >>> measured_quantities('(r < 0.5 * avg_over_time(r[1d]) or r < 0.05) and on (job) (sum by (job) (n) >= 20)')
    ['r', 'sum by (job) (n)']
    """
    text = unwrapped(expr)
    outer = outer_level(text)
    operators = list(SET_OPERATOR.finditer(outer))
    if operators:
        bounds = [0, *(point for match in operators for point in match.span()), len(text)]
        parts = [text[start:end] for start, end in zip(bounds[::2], bounds[1::2], strict=True)]
        return list(dict.fromkeys(quantity for part in parts for quantity in measured_quantities(part)))
    comparison = COMPARISON.search(outer)
    return [text[: comparison.start()].strip() if comparison else text]


def capped_offsets(expr: str, most_s: int) -> str:
    """`expr` with every `offset` longer than `most_s` seconds shortened to it.

    >>> capped_offsets("x - x offset 30m + rate(y[1h] offset 5s)", 60)
    'x - x offset 60s + rate(y[1h] offset 5s)'
    """
    return OFFSET.sub(lambda match: f"offset {most_s}s" if duration_seconds(match[1]) > most_s else match[0], expr)
