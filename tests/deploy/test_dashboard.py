"""deploy/grafana/saxplane-cell.json against a running cell: every metric its PromQL names is
exported by one of the parts (an admin, a model server with a tiny model and a frontend, as
processes, after a little traffic), with the labels the queries group and filter by."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Iterator

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.cluster import AdminProcess, FrontendProcess, ModelServerProcess, publish_and_wait
from tests.deploy import deploylib as dl

DASHBOARD = dl.REPO / "deploy" / "grafana" / "saxplane-cell.json"
# Words of PromQL that are not metric names (functions are told by the "(" after them).
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
            "offset", "inf", "nan"}
# Labels Prometheus adds at scrape time (or that only histogram buckets carry).
SCRAPE_LABELS = {"instance", "job", "le"}
SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count", "_created"),
            "gauge": ("",), "summary": ("_sum", "_count", "_created"), "unknown": ("",)}


def _panels(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    for p in node.get("panels", []):
        yield p
        yield from _panels(p)


def dashboard_queries(dash: dict[str, Any]) -> list[str]:
    """Every PromQL expression: the panels' targets and the template variables' queries."""
    out = [t["expr"] for p in _panels(dash) for t in p.get("targets", []) if t.get("expr")]
    for var in dash.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            q = var["query"]["query"] if isinstance(var["query"], dict) else var["query"]
            m = re.fullmatch(r"label_values\((.+),\s*(\w+)\)", q.strip())
            assert m, f"variable {var['name']}: expected label_values(metric, label), got {q!r}"
            out.append(f"sum by ({m.group(2)}) ({m.group(1)})")
    return out


def metric_names(expr: str) -> set[str]:
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)       # strings (label values, $variables)
    s = re.sub(r"\{[^}]*\}", " ", s)                   # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                  # range selectors
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[a-zA-Z_:][a-zA-Z0-9_:]*", s):
        if s[m.end():].lstrip().startswith("(") or m.group(0).lower() in KEYWORDS:
            continue  # a function or an aggregation, or a keyword
        names.add(m.group(0))
    return names


def label_names(expr: str) -> set[str]:
    """Labels an expression filters on (matchers) or groups by."""
    out = {m.group(1) for sel in re.findall(r"\{([^}]*)\}", expr) for m in re.finditer(r"(\w+)\s*(?:=~|!~|!=|=)", sel)}
    for group in re.findall(r"\b(?:by|without|on|ignoring)\s*\(([^)]*)\)", expr):
        out |= {g.strip() for g in group.split(",") if g.strip()}
    return out


def test_query_parsing() -> None:
    expr = ('histogram_quantile(0.95, sum by (le, model_name) (rate(vllm:time_to_first_token_seconds_bucket'
            '{model_name=~"$model", x!="a{b}"}[$__rate_interval]))) / on (model) sax:slots_total')
    assert metric_names(expr) == {"vllm:time_to_first_token_seconds_bucket", "sax:slots_total"}
    assert label_names(expr) == {"le", "model_name", "x", "model"}


class Exposition:
    """What the parts' /metrics expose: sample names with their label sets, and declared names."""

    def __init__(self) -> None:
        self.samples: dict[str, list[dict[str, str]]] = {}
        self.declared: dict[str, str] = {}

    def add(self, text: str, part: str) -> None:
        for fam in text_string_to_metric_families(text):
            for suffix in SUFFIXES.get(fam.type, ("",)):
                self.declared[fam.name + suffix] = part
            for s in fam.samples:
                self.samples.setdefault(s.name, []).append(s.labels)
                self.declared.setdefault(s.name, part)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory, tiny_compiled: None) -> Iterator[Exposition]:
    tmp = tmp_path_factory.mktemp("dashboard-cell")
    admin = AdminProcess(tmp, root=str(tmp / "root")).start()
    ms = ModelServerProcess(tmp, admin=f"127.0.0.1:{admin.port}").start()
    # One worker: its registry declares every family, also those no request has touched yet
    # (several workers aggregate only the families some worker wrote).
    fe = FrontendProcess(tmp, admin.port, "--workers", "1")
    try:
        fe.start()
        publish_and_wait(admin.url, "/sax/test/tiny")
        model = "/sax/test/tiny"
        for stream in (False, True):
            r = requests.post(f"{fe.url}/v1/completions", timeout=60, stream=stream, json={
                "model": model, "prompt": "hello there", "max_tokens": 4, "stream": stream})
            assert r.status_code == 200, r.text
            r.content  # noqa: B018 - read the stream to its end
        assert requests.post(f"{fe.url}/generate", timeout=60, json={"model": model, "query": "hi"}).status_code == 200
        assert requests.post(f"{fe.url}/v1/completions", timeout=10, json={
            "model": "/sax/test/nope", "prompt": "x"}).status_code == 404  # an error by kind
        out = Exposition()
        for part, url in (("admin", admin.url), ("model-server", ms.url), ("frontend", fe.url)):
            r = requests.get(f"{url}/metrics", timeout=10)
            assert r.status_code == 200, (part, r.text)
            out.add(r.text, part)
        yield out
    finally:
        fe.stop()
        ms.stop()
        admin.stop()


@pytest.mark.slow
def test_every_dashboard_metric_is_exported_by_the_cell(exported: Exposition) -> None:
    dash = json.loads(Path(DASHBOARD).read_text())
    queries = dashboard_queries(dash)
    assert len(queries) >= 20
    used = {name for q in queries for name in metric_names(q)}
    missing = sorted(used - set(exported.declared))
    assert not missing, f"the dashboard queries metrics no part exports: {missing}"
    # Every part's metrics are on the dashboard somewhere.
    assert {exported.declared[n] for n in used} == {"admin", "model-server", "frontend"}
    # The labels a query filters or groups by are on the metric's samples.
    for q in queries:
        for name in metric_names(q):
            samples = exported.samples.get(name)
            if not samples:
                continue  # declared, not yet observed (e.g. retries): no labels to compare
            have = set().union(*(s.keys() for s in samples))
            lacking = label_names(q) - have - SCRAPE_LABELS
            assert not lacking, f"{name} has no label {sorted(lacking)} (query: {q})"
    # Every target reads the datasource the dashboard's variable picks.
    for p in _panels(dash):
        for t in p.get("targets", []):
            assert t["datasource"]["uid"] == "${datasource}", p["title"]
