"""Schemathesis over a live frontend's /openapi.json: positive and negative cases for every
operation, sent to the real gunicorn frontend (and so to real model servers and admin).

Every answer is checked: no 5xx, an answer within the time bound, errors in the API's shape
(OpenAI's envelope on /v1/* and the tokenizer routes, `{"error": message}` on the Saxml
routes), streams made of JSON events ending in `[DONE]`, and schemathesis's own checks
(status code and content type documented, JSON bodies conforming to the schema, bodies that
break the schema refused).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import (content_type_conformance, negative_data_rejection, response_schema_conformance,
                                 status_code_conformance)

OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")
CHECKS = [status_code_conformance, content_type_conformance, response_schema_conformance, negative_data_rejection]
CHEAP_TOKENS = 4      # generated tokens per case (the tiny model's window is 128)
CHEAP_N = 2


@dataclass
class Target:
    """Where an operation's cases go and what they may carry."""
    base_url: str
    headers: dict[str, str] = field(default_factory=dict)
    models: tuple[str, ...] = ()       # real model names swapped into some cases
    cell: str | None = None            # the admin's cell, swapped into some generated model ids


@dataclass
class Report:
    cases: int = 0
    by_operation: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)
    slowest: float = 0.0

    def fail(self, case: Any, why: str) -> None:
        if len(self.failures) < 20:
            try:
                curl = case.as_curl_command()
            except Exception:  # noqa: BLE001 - the report must not fail
                curl = f"{case.method} {case.formatted_path} {case.body!r}"[:2000]
            self.failures.append(f"{case.operation.label}: {why}\n    {curl[:2000]}")


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def make_cheap(op_id: str, body: Any) -> None:
    """Keeps generation cheap without touching validation: values in the valid range are
    lowered (max_tokens, n, decode steps, samples), values outside it are left for the server
    to refuse, and absent lengths get a small one instead of the model's whole window."""
    if not isinstance(body, dict):
        return
    if op_id in ("completions", "chat"):
        for key in ("max_tokens", "max_completion_tokens"):
            if _is_int(body.get(key)) and CHEAP_TOKENS < body[key] <= 128:
                body[key] = CHEAP_TOKENS
        if body.get("max_tokens") is None and body.get("max_completion_tokens") is None:
            body["max_tokens"] = CHEAP_TOKENS
        if _is_int(body.get("n")) and CHEAP_N < body["n"] <= 8:
            body["n"] = CHEAP_N
        if _is_int(body.get("best_of")) and CHEAP_N < body["best_of"] <= 8:
            body["best_of"] = CHEAP_N
        if op_id == "completions" and isinstance(body.get("prompt"), list) and 8 < len(body["prompt"]) <= 1024 \
                and all(isinstance(p, (str, list)) for p in body["prompt"]):
            del body["prompt"][8:]  # a prompt list fans out: 8 calls are enough
    if op_id == "generate":
        if "extra_inputs" not in body:
            body["extra_inputs"] = {}
        extra = body["extra_inputs"]
        if isinstance(extra, dict):
            steps = extra.get("per_example_max_decode_steps")
            if steps is None or _is_num(steps) and CHEAP_TOKENS < steps <= 1e6:
                extra["per_example_max_decode_steps"] = CHEAP_TOKENS
            if _is_num(extra.get("num_samples")) and CHEAP_N < extra["num_samples"] <= 8:
                extra["num_samples"] = CHEAP_N


def swap_model(case: Any, op_id: str, name: str | None, cell: str | None) -> None:
    """Puts a real model name where the case has a generated string (not where the case
    breaks the schema with a non-string), so cases reach a replica, not only the 404; or,
    for the mutations, the admin's own cell into generated model ids, so they reach its
    validation and state, not only the wrong-cell 400."""
    if name is None:
        return
    if cell is not None:
        model = case.body.get("model") if isinstance(case.body, dict) else None
        if isinstance(model, str) and model.startswith("/sax/") and model.count("/") == 3:
            case.body["model"] = f"{cell}/{model.rsplit('/', 1)[1]}"
        return
    if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
        case.body["model"] = name
    if op_id == "tokenizer_info" and isinstance(case.query, dict) and isinstance(case.query.get("model"), str):
        case.query["model"] = name
    if op_id == "retrieve_model" and isinstance(case.path_parameters, dict) and \
            isinstance(case.path_parameters.get("model"), str):
        case.path_parameters["model"] = name.lstrip("/")
    if op_id == "listcell" and isinstance(case.query, dict) and isinstance(case.query.get("model"), str):
        case.query["model"] = name
    if op_id == "listall" and isinstance(case.query, dict) and isinstance(case.query.get("sax_cell"), str):
        case.query["sax_cell"] = name.rsplit("/", 1)[0] if name.startswith("/sax/") else "/sax/test"


def check_answer(case: Any, resp: requests.Response, report: Report) -> None:
    path = case.operation.path
    if resp.status_code >= 500:
        report.fail(case, f"{resp.status_code}: {resp.text[:300]}")
        return
    ctype = resp.headers.get("Content-Type", "")
    if resp.status_code >= 400:
        try:
            err = resp.json()["error"]
        except (ValueError, KeyError, TypeError):
            report.fail(case, f"{resp.status_code} without an error body: {resp.text[:300]}")
            return
        if path.startswith(OPENAI_PATHS):
            if not (isinstance(err, dict) and set(err) == {"message", "type", "param", "code"}
                    and isinstance(err["message"], str) and err["message"]):
                report.fail(case, f"{resp.status_code} not in OpenAI's envelope: {resp.text[:300]}")
        elif not (isinstance(err, str) and err):
            report.fail(case, f"{resp.status_code} not in the Saxml shape {{'error': message}}: {resp.text[:300]}")
    elif ctype.startswith("text/event-stream"):
        events = [line[6:] for line in resp.text.split("\n") if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            report.fail(case, f"stream without a final [DONE]: {resp.text[-300:]}")
        for e in events[:-1]:
            try:
                chunk = json.loads(e)
            except ValueError:
                report.fail(case, f"stream event is not JSON: {e[:300]}")
                break
            if "error" in chunk:
                report.fail(case, f"stream broke off: {e[:300]}")
                break


def fuzz(schema: Any, targets: dict[str, Target], budget: dict[str, int], report: Report,
         timeout_s: float = 30.0) -> None:
    """Runs `budget[operationId]` generated cases (positive and negative) of each operation
    of `schema` named in `targets`, recording every problem in `report` (never raising, so
    nothing shrinks: a failure is reported as generated)."""
    for result in schema.get_all_operations():
        op = result.ok()
        op_id = op.definition.raw.get("operationId", op.label)
        if op_id not in targets or not budget.get(op_id):
            continue
        target = targets[op_id]
        strategies = [op.as_strategy(GenerationMode.POSITIVE)]
        try:
            strategies.append(op.as_strategy(GenerationMode.NEGATIVE))
        except Exception:  # noqa: BLE001 - an operation with nothing to break has no negative cases
            pass
        names = st.sampled_from((None, *target.models)) if target.models else \
            st.sampled_from((None, "cell")) if target.cell else st.none()
        session = requests.Session()
        _run_operation(op_id, st.one_of(strategies), names, target, session, report, budget[op_id], timeout_s)
        session.close()


def _run_operation(op_id: str, cases: Any, names: Any, target: Target, session: requests.Session,
                   report: Report, examples: int, timeout_s: float) -> None:
    @settings(max_examples=examples, deadline=None, database=None, phases=[Phase.explicit, Phase.generate],
              suppress_health_check=list(HealthCheck), print_blob=False)
    @given(case=cases, name=names)
    def one(case: Any, name: str | None) -> None:
        swap_model(case, op_id, name, target.cell)
        make_cheap(op_id, case.body)
        _ = case.meta  # schemathesis re-judges the edited case (positive or negative) on reading it
        started = time.monotonic()
        try:
            resp = case.call(base_url=target.base_url, session=session, headers=target.headers,
                             timeout=timeout_s)
        except requests.RequestException as e:
            report.fail(case, f"no answer within {timeout_s}s: {type(e).__name__}: {e}")
            return
        finally:
            report.cases += 1
            report.by_operation[op_id] = report.by_operation.get(op_id, 0) + 1
        report.slowest = max(report.slowest, time.monotonic() - started)
        report.statuses[resp.status_code] = report.statuses.get(resp.status_code, 0) + 1
        check_answer(case, resp, report)
        try:
            case.validate_response(resp, checks=CHECKS)
        except (AssertionError, BaseExceptionGroup) as e:  # schemathesis's FailureGroup: one per failed check
            failures = e.exceptions if isinstance(e, BaseExceptionGroup) else [e]
            report.fail(case, f"{resp.status_code}: " + " | ".join(
                " ".join(str(f).split()) [:400] for f in failures))

    one()


def schema_from(url: str) -> Any:
    return schemathesis.openapi.from_url(f"{url}/openapi.json")

