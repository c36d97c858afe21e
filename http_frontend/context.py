"""What every route of one frontend worker shares, and small request helpers."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from flask import current_app, g, request

from common.http import parse_json, read_body
from client.admin import AdminClient
from client.router import Router
from http_frontend.admission import Admission
from http_frontend.catalog import Catalog
from http_frontend.errors import FrontendError
from http_frontend.exchange import Exchange
from http_frontend.fanout import FanOut
from http_frontend.metrics import FrontendMetrics
from http_frontend.settings import FrontendSettings
from http_frontend.upstream import Upstream


@dataclass
class Frontend:
    settings: FrontendSettings
    admin: AdminClient
    router: Router
    catalog: Catalog
    metrics: FrontendMetrics
    admission: Admission
    upstream: Upstream
    fanout: FanOut
    pool: ThreadPoolExecutor
    streams: Admission          # open streams per API key (keyed by a hash of the key)

    def close(self) -> None:
        self.router.close()
        self.pool.shutdown(wait=False, cancel_futures=True)


def frontend() -> Frontend:
    return current_app.extensions["sax_frontend"]


def exchange() -> Exchange:
    return g.exchange


def json_body(*, allow_empty: bool = False) -> dict[str, Any]:
    """The request's JSON object (also on GET, as the Saxml API sends it); 400 otherwise."""
    raw = read_body(request)
    if not raw.strip():
        if allow_empty:
            return {}
        raise FrontendError(400, "the request needs a JSON object body")
    try:
        data = parse_json(raw)
    except ValueError as e:
        raise FrontendError(400, f"We could not parse the JSON body of your request: {e}") from None
    if not isinstance(data, dict):
        raise FrontendError(400, "the request body must be a JSON object")
    return data


def check_n(value: Any, cap: int, param: str = "n") -> None:
    """400 for a number of samples over the frontend's --max-n, before any routing (other bad
    values are the replica's to refuse)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > cap:
        raise FrontendError(400, f"'{param}' is {value}, more than this frontend's limit of {cap}", param=param)
