"""HTTP client of the admin server's API (see admin_server/README.md, "Admin API")."""
from __future__ import annotations

import os
from typing import Any

import requests

from client import errors
from common.naming import InvalidArgument, parse_model_id
from common.settings import DEFAULT_ADMIN


def admin_url(address: str | None = None) -> str:
    address = address or os.environ.get("SAX_ADMIN") or DEFAULT_ADMIN
    return address.rstrip("/") if "://" in address else f"http://{address.rstrip('/')}"


class AdminClient:
    def __init__(self, address: str | None = None, *, token: str | None = None, timeout_s: float = 30.0,
                 session: requests.Session | None = None) -> None:
        self.url = admin_url(address)
        self.token = token if token is not None else os.environ.get("SAX_ADMIN_TOKEN")
        self.timeout_s = timeout_s
        self.session = session or requests.Session()

    def _call(self, method: str, path: str, *, json: Any = None, params: dict[str, Any] | None = None,
              token: str | None = None, timeout: float | None = None) -> Any:
        headers = {"Authorization": f"Bearer {token or self.token}"} if (token or self.token) else {}
        try:
            r = self.session.request(method, self.url + path, json=json, params=params, headers=headers,
                                     timeout=timeout or self.timeout_s)
        except requests.RequestException as e:
            raise errors.Unavailable(f"admin server {self.url} unreachable: {e}") from e
        try:
            body = r.json()
        except ValueError:
            body = r.text
        if r.status_code >= 400:
            raise errors.from_response(r.status_code, body)
        return body

    @staticmethod
    def _path(model_id: str, prefix: str = "/models") -> str:
        """`prefix` + the model id, refused unless it is a well-formed id: a caller's id goes
        into the URL, where "/sax/c/../../leader" would name another route of the admin."""
        try:
            text = model_id if not isinstance(model_id, str) or model_id.startswith("/") else "/" + model_id
            return prefix + str(parse_model_id(text))
        except InvalidArgument as e:
            raise errors.InvalidArgument(str(e), 400) from None

    # Mutations ------------------------------------------------------------------------
    def publish(self, model_id: str, model_path: str, checkpoint: str | None, replicas: int,
                overrides: dict[str, Any] | None = None, *, min_replicas: int | None = None,
                max_replicas: int | None = None, idle_seconds: float | None = None) -> dict[str, Any]:
        """`min_replicas`/`max_replicas` bound autoscaling (both default to `replicas`; min 0
        lets an idle model scale to zero); `idle_seconds` (admin default 300) is how long a
        replica above the minimum may go without requests before it is released."""
        return self._call("POST", "/models", json={
            "model_id": model_id, "model_path": model_path,
            "checkpoint": "None" if checkpoint is None else checkpoint, "replicas": replicas,
            "overrides": overrides or {}, **_scaling(min_replicas, max_replicas, idle_seconds)})

    def update(self, model_id: str, *, model_path: str | None = None, checkpoint: str | None = None,
               replicas: int | None = None, min_replicas: int | None = None,
               max_replicas: int | None = None, idle_seconds: float | None = None) -> dict[str, Any]:
        body: dict[str, Any] = _scaling(min_replicas, max_replicas, idle_seconds)
        if model_path is not None:
            body["model_path"] = model_path
        if checkpoint is not None:
            body["checkpoint"] = checkpoint
        if replicas is not None:
            body["replicas"] = replicas
        return self._call("PATCH", self._path(model_id), json=body)

    def unpublish(self, model_id: str) -> dict[str, Any]:
        return self._call("DELETE", self._path(model_id))

    # Reads ----------------------------------------------------------------------------
    def model(self, model_id: str) -> dict[str, Any]:
        return self._call("GET", self._path(model_id))

    def models(self, cell: str | None = None, detail: bool = False) -> list[Any]:
        params: dict[str, Any] = {"detail": int(detail)}
        if cell:
            params["cell"] = cell
        return self._call("GET", "/models", params=params)["models"]

    def servers(self) -> list[dict[str, Any]]:
        return self._call("GET", "/servers")["servers"]

    def stats(self) -> dict[str, Any]:
        return self._call("GET", "/stats")

    def locate(self, model_id: str, *, version: str | None = None, wait_s: float = 0.0) -> dict[str, Any]:
        """Ready replica addresses; with `version` and `wait_s`, long-polls for a change."""
        params: dict[str, Any] = {}
        if version:
            params = {"version": version, "timeout": wait_s}
        return self._call("GET", self._path(model_id, "/locate"), params=params,
                          timeout=wait_s + self.timeout_s)

    def demand(self, model_id: str) -> dict[str, Any]:
        """Asks the admin to load an idle model (a call is waiting); answers as `locate`."""
        return self._call("POST", self._path(model_id, "/demand"))

    def healthz(self) -> dict[str, Any]:
        return self._call("GET", "/healthz", timeout=5)

    # Model servers --------------------------------------------------------------------
    def heartbeat(self, server: dict[str, Any], models: list[dict[str, Any]], *,
                  desired_version: int | None = None, cluster_token: str | None = None,
                  timeout_s: float = 10.0) -> dict[str, Any]:
        """Reports this server; the answer holds its desired set, or `unchanged: true`
        when `desired_version` is still current and the report is as last sent."""
        return self._call("POST", "/heartbeat", json={"server": server, "models": models,
                                                      "desired_version": desired_version},
                          token=cluster_token, timeout=timeout_s)


def _scaling(min_replicas: int | None, max_replicas: int | None, idle_seconds: float | None) -> dict[str, Any]:
    given = {"min_replicas": min_replicas, "max_replicas": max_replicas, "idle_seconds": idle_seconds}
    return {k: v for k, v in given.items() if v is not None}
