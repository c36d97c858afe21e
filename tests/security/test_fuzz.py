"""Schemathesis against the real frontends, from their own /openapi.json (see fuzz.py).

Data routes go to the session cell's open frontend (two model servers behind it), with real
model names swapped into some cases; the mutations (publish, unpublish, update) go to the
locked cell's frontend with its admin token, with the admin's cell swapped into some model
ids (its admin has no server able to load what a fuzzed publish names); a few data routes go
there too, with an API key, through its lower limits.
"""
from __future__ import annotations

import time

import requests

from tests.frontend.conftest import ALIAS, FLAG_ALIAS, MODEL, Cell
from tests.security.conftest import ADMIN, FAKE, KEY, Locked
from tests.security.fuzz import Report, Target, fuzz, schema_from

OPEN_BUDGET = {  # generated cases per operation, on the open frontend
    "completions": 200, "chat": 150, "generate": 80, "score": 60, "embeddings": 60, "tokenize": 60,
    "detokenize": 50, "tokenizer_info": 40, "retrieve_model": 40, "listall": 30, "listcell": 40,
    "list_models": 10, "index": 5, "healthz": 5, "metrics": 5,   # (schemathesis leaves out /openapi.json itself)
}
MUTATION_BUDGET = {"publish": 100, "unpublish": 40, "update_put": 40, "update_post": 40}
LOCKED_DATA_BUDGET = {"completions": 40, "chat": 40, "generate": 30}
MIN_CASES = 1000


def test_fuzz_every_route(cell: Cell, locked: Locked) -> None:
    report = Report()
    started = time.monotonic()
    open_data = Target(cell.url, models=(MODEL, ALIAS, FLAG_ALIAS))
    fuzz(schema_from(cell.url), {op: open_data for op in OPEN_BUDGET}, OPEN_BUDGET, report)
    locked_schema = schema_from(locked.url)
    locked_data = Target(locked.url, headers=KEY, models=(MODEL,))
    fuzz(locked_schema, {op: locked_data for op in LOCKED_DATA_BUDGET}, LOCKED_DATA_BUDGET, report)
    # Last: fuzzed publishes may name aliases ("0") of models that never get a replica (a 503).
    mutations = Target(locked.url, headers=ADMIN, cell="/sax/test")
    fuzz(locked_schema, {op: mutations for op in MUTATION_BUDGET}, MUTATION_BUDGET, report)
    elapsed = time.monotonic() - started
    print(f"\nfuzzed {report.cases} cases in {elapsed:.1f}s (slowest answer {report.slowest:.2f}s): "
          f"statuses {dict(sorted(report.statuses.items()))}, per operation {report.by_operation}")
    assert not report.failures, f"{len(report.failures)}+ failures:\n" + "\n".join(report.failures)
    assert report.cases >= MIN_CASES, report.by_operation
    assert set(report.by_operation) == set(OPEN_BUDGET) | set(MUTATION_BUDGET), "an operation went untested"
    assert report.statuses.get(200, 0) > 100, "too few cases got through to a replica"

    # Both cells still serve, from every replica.
    for url, headers in ((cell.url, {}), (locked.url, KEY)):
        for _ in range(3):
            r = requests.post(f"{url}/v1/completions", headers=headers, timeout=60,
                              json={"model": MODEL, "prompt": "hello", "max_tokens": 4, "temperature": 0})
            assert r.status_code == 200, r.text
            assert r.json()["usage"]["completion_tokens"] >= 1
    for server in cell.model_server_urls + [locked.model_server.url]:
        assert "LOADED" in requests.get(f"{server}/healthz", timeout=10).json()["models"].values()
    # What the fuzzed publishes left behind goes, so the locked cell's reconciler idles again.
    for model_id in requests.get(f"{locked.admin.url}/models", timeout=10).json()["models"]:
        if model_id not in (MODEL, FAKE):
            requests.delete(f"{locked.admin.url}/models{model_id}", headers=ADMIN, timeout=10)
