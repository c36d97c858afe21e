"""HTML status pages: the cell at `/` (for callers that prefer HTML), `/model/<model id>`
and `/server/<address>`.

Jinja templates (autoescaped) under templates/status/, a stylesheet and a small script under
static/status/; the script refetches the page's main part every few seconds
(`X-Sax-Fragment: 1`) so a page follows the cell without reloading. With an admin token
set, the pages need it: a login form puts an HMAC of it in an HttpOnly cookie (the token
itself never travels in a URL or a cookie); `Authorization: Bearer <token>` works too.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import Any
from urllib.parse import urlsplit

from flask import (Blueprint, Response, abort, current_app, make_response, redirect, render_template,
                   request, url_for)

from admin_server import status_view
from admin_server.errors import NotFound
from admin_server.leader import lease_name
from admin_server.lease import current_lease
from common.naming import InvalidArgument

bp = Blueprint("status", __name__, template_folder="templates", static_folder="static/status",
               static_url_path="/status-static")
COOKIE = "sax_status"
REFRESH_S = 2.0
# The pages load their own script and stylesheet only; nothing inline runs.
CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; connect-src 'self'; "
       "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


def _ctx():  # type: ignore[no-untyped-def]
    return current_app.extensions["sax_admin"]


def _cookie_value(token: str) -> str:
    return hmac.new(token.encode(), b"saxplane status pages", hashlib.sha256).hexdigest()


def _signed_in() -> bool:
    token = _ctx().settings.admin_token
    if not token:
        return True
    auth = request.headers.get("Authorization", "")
    if auth.lower().startswith("bearer ") and hmac.compare_digest(auth[7:].strip().encode(), token.encode()):
        return True
    return hmac.compare_digest(request.cookies.get(COOKIE, "").encode(), _cookie_value(token).encode())


def _safe_next(target: str | None) -> str:
    """Only a path on this server (no scheme, no host, not `//host`)."""
    if not target:
        return "/"
    parts = urlsplit(target)
    if parts.scheme or parts.netloc or not target.startswith("/") or target.startswith("//") or "\\" in target:
        return "/"
    return target


def _page(template: str, status: int = 200, *, live: bool = True, **values: Any) -> Response:
    fragment = request.headers.get("X-Sax-Fragment") == "1"
    html = render_template(f"status/{template}", fragment=fragment, refresh_s=REFRESH_S, live=live,
                           cell=_ctx().settings.cell, token_set=bool(_ctx().settings.admin_token), **values)
    resp = make_response(html, status)
    resp.headers["Content-Type"] = "text/html; charset=utf-8"
    resp.headers["Cache-Control"] = "no-store"
    resp.headers["Vary"] = "Accept, X-Sax-Fragment, Cookie"
    return resp


@bp.after_request
def _headers(resp: Response) -> Response:
    if resp.mimetype == "text/html":
        resp.headers["Content-Security-Policy"] = CSP
        resp.headers["X-Content-Type-Options"] = "nosniff"
        resp.headers["Referrer-Policy"] = "same-origin"
    return resp


def _guard() -> Response | None:
    if _signed_in():
        return None
    if request.headers.get("X-Sax-Fragment") == "1":
        return make_response("sign in again", 401)
    return redirect(url_for("status.login", next=request.full_path.rstrip("?")))


def _prefers_html() -> bool:
    """A browser's Accept (text/html over */*), not curl's */* nor a JSON client's."""
    accept = request.accept_mimetypes
    return accept["text/html"] > accept["application/json"]


@bp.route("/", methods=["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"],
          provide_automatic_options=False)
def cell():  # type: ignore[no-untyped-def]
    """HTML for browsers; any other caller gets the answer `/` always gave (404 JSON)."""
    if request.method not in ("GET", "HEAD") or not _prefers_html():
        abort(404)
    if (denied := _guard()) is not None:
        return denied
    c = _ctx()
    with c.sessions() as s:
        view = status_view.cell_page(s, c.settings, current_lease(c.engine, lease_name(c.settings)))
    return _page("cell.html", view=view, dead_after_s=c.settings.dead_after_s)


@bp.get("/model/<path:name>")
def model(name: str):  # type: ignore[no-untyped-def]
    if (denied := _guard()) is not None:
        return denied
    c = _ctx()
    model_id = "/" + name.strip("/")
    try:
        with c.sessions() as s:
            view = status_view.model_page(s, c.settings, model_id)
    except (NotFound, InvalidArgument) as e:
        return _page("missing.html", 404, what=model_id, reason=str(e))
    return _page("model.html", view=view)


@bp.get("/server/<path:address>")
def server(address: str):  # type: ignore[no-untyped-def]
    if (denied := _guard()) is not None:
        return denied
    c = _ctx()
    try:
        with c.sessions() as s:
            view = status_view.server_page(s, c.settings, address)
    except NotFound as e:
        return _page("missing.html", 404, what=address, reason=str(e))
    return _page("server.html", view=view, dead_after_s=c.settings.dead_after_s)


@bp.route("/login", methods=["GET", "POST"])
def login():  # type: ignore[no-untyped-def]
    token = _ctx().settings.admin_token
    target = _safe_next(request.values.get("next"))
    if not token:
        return redirect(target)
    if request.method == "GET":
        return _page("login.html", live=False, next=target, failed=False)
    given = request.form.get("token", "")
    if not hmac.compare_digest(given.encode(), token.encode()):
        return _page("login.html", 401, live=False, next=target, failed=True)
    resp = redirect(target, code=303)
    resp.set_cookie(COOKIE, _cookie_value(token), httponly=True, samesite="Strict", secure=request.is_secure,
                    path="/")
    return resp


@bp.post("/logout")
def logout():  # type: ignore[no-untyped-def]
    resp = redirect(url_for("status.login"), code=303)
    resp.delete_cookie(COOKIE, path="/")
    return resp


@bp.app_template_filter("human_bytes")
def human_bytes(n: int | float | None) -> str:
    if not n:
        return "0 B" if n == 0 else "-"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


@bp.app_template_filter("seconds")
def seconds(s: float | None) -> str:
    if s is None:
        return "-"
    return f"{s * 1000:.0f} ms" if s < 1 else f"{s:.1f} s"
