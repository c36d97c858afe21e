"""The admin's HTML status pages.

In-process (the real app on SQLite, state written through the real API): content negotiation
at `/`, escaping of hostile strings, the admin token's login form and cookie. In a real browser
(Debian's chromium driven by Playwright) against a live cell (an admin and a model server with
a tiny model, as processes): what the pages show, a FAILED load's error, and a publish that
appears without a reload; screenshots go to the test's folder (and to $SAX_SCREENSHOT_DIR
when set: docs/status-page.png is made that way).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest
import requests
from flask import Flask

from tests.cluster import AdminProcess, ModelServerProcess, publish_and_wait, wait_until

CHROMIUM = "/usr/bin/chromium"
HTML = {"Accept": "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"}
HOSTILE = '<img src=x onerror="window.__xss=1"><script>window.__xss=2</script>'


def _beat(address: str, **server: Any) -> dict[str, Any]:
    return {"server": {"address": address, "boot_id": "b1", "chip": "cpu", "topology": "1",
                       "device_count": 1, "memory_bytes": 8 << 30, "tags": [], "servable_model_paths": ["test.tiny"],
                       **server}, "models": []}


# -- in-process ---------------------------------------------------------------------------------

def test_json_clients_keep_their_answers(make_app: Callable[..., Flask]) -> None:
    c = make_app(run_leader=False).test_client()
    for headers in ({}, {"Accept": "*/*"}, {"Accept": "application/json"},
                    {"Accept": "application/json, text/html"}):
        r = c.get("/", headers=headers)
        assert r.status_code == 404 and r.json["error"]["code"] == "NOT_FOUND", headers
    for method in ("post", "put", "delete", "options"):
        r = getattr(c, method)("/", headers=HTML)
        assert r.status_code == 404 and r.json["error"]["code"] == "NOT_FOUND", method
    assert c.get("/models").json == {"models": []}
    r = c.get("/", headers=HTML)
    assert r.status_code == 200 and r.mimetype == "text/html"
    assert "script-src 'self'" in r.headers["Content-Security-Policy"] and r.headers["Cache-Control"] == "no-store"
    assert "<h1>Cell /sax/test</h1>" in r.get_data(as_text=True)
    # The live refresh asks for the main part alone.
    frag = c.get("/", headers={**HTML, "X-Sax-Fragment": "1"}).get_data(as_text=True)
    assert "<h1>Cell /sax/test</h1>" in frag and "<html" not in frag
    assert c.get("/status-static/live.js").status_code == 200


def test_pages_escape_every_string(make_app: Callable[..., Flask]) -> None:
    c = make_app(heartbeat_interval_s=10.0).test_client()  # the server stays alive for the whole test
    address = f"{HOSTILE}:1"
    beat = _beat(address, chip=HOSTILE, topology=HOSTILE, tags=[HOSTILE], servable_model_paths=["test.tiny", HOSTILE])
    assert c.post("/heartbeat", json=beat).status_code == 200
    assert c.post("/models", json={"model_id": "/sax/test/m", "model_path": "test.tiny", "checkpoint": None,
                                   "replicas": 1}).status_code == 201
    # The leader places the model on the (only) server, whose next heartbeat reports its load failed.
    wait_until(lambda: "/sax/test/m" in c.post("/heartbeat", json=beat).get_data(as_text=True), timeout=20,
               interval=0.1, what="model assigned")
    failed = {**beat, "models": [{"model_id": "/sax/test/m", "generation": 1, "status": "FAILED", "error": HOSTILE}]}
    assert c.post("/heartbeat", json=failed).status_code == 200
    wait_until(lambda: c.get("/models/sax/test/m").json["last_error"], timeout=20, what="failure recorded")
    pages = {"/": c.get("/", headers=HTML), "/model": c.get("/model/sax/test/m", headers=HTML)}
    # The server's page, linked from the cell page (the hostile address quoted in the URL).
    cell_html = pages["/"].get_data(as_text=True)
    link = cell_html.split('<tr data-server="', 1)[1].split('<a href="', 1)[1].split('"', 1)[0]
    assert link.startswith("/server/%3Cimg"), link
    pages["/server"] = c.get(link.replace("&amp;", "&"), headers=HTML)
    pages["missing"] = c.get("/model/sax/test/" + HOSTILE, headers=HTML)
    for name, r in pages.items():
        body = r.get_data(as_text=True)
        assert r.status_code == (404 if name == "missing" else 200), name
        assert "<img" not in body and "<script>window" not in body and "onerror=\"window" not in body, name
        assert "&lt;img src=x onerror=" in body, name
    assert pages["/server"].get_data(as_text=True).count("&lt;script&gt;window.__xss=2&lt;/script&gt;") >= 4


def test_admin_token_login_form_and_cookie(make_app: Callable[..., Flask]) -> None:
    token = "s3cret-admin-token"
    c = make_app(run_leader=False, admin_token=token).test_client()
    r = c.get("/model/sax/test/m", headers=HTML)
    assert r.status_code == 302 and r.headers["Location"].startswith("/login?next=/model/sax/test/m")
    assert c.get("/", headers={**HTML, "X-Sax-Fragment": "1"}).status_code == 401
    assert c.get("/", headers=HTML).status_code == 302
    assert c.get("/").status_code == 404  # JSON callers: unchanged
    r = c.post("/login", data={"token": "wrong", "next": "/"})
    assert r.status_code == 401 and "not this cell" in r.get_data(as_text=True)
    # Only a path on this server is a place to go back to.
    r = c.post("/login", data={"token": token, "next": "//evil.example/x"})
    assert r.status_code == 303 and r.headers["Location"] == "/"
    cookie = r.headers["Set-Cookie"]
    assert "HttpOnly" in cookie and "SameSite=Strict" in cookie and token not in cookie
    assert c.get("/", headers=HTML).status_code == 200
    r = c.post("/logout")
    assert r.status_code == 303 and c.get("/", headers=HTML).status_code == 302
    fresh = make_app(run_leader=False, admin_token=token, root=str(Path(c.application.extensions[
        "sax_admin"].settings.root))).test_client()
    assert fresh.get("/", headers={**HTML, "Authorization": f"Bearer {token}"}).status_code == 200
    assert fresh.get("/", headers={**HTML, "Authorization": "Bearer nope"}).status_code == 302


# -- in a browser, against a live cell ------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if not os.path.exists(CHROMIUM):
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install chromium` (.ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def _shot(page: Any, tmp_path: Path, name: str) -> Path:
    out = tmp_path / f"{name}.png"
    page.screenshot(path=str(out), full_page=True)
    if os.environ.get("SAX_SCREENSHOT_DIR"):
        shutil.copy(out, Path(os.environ["SAX_SCREENSHOT_DIR"]) / out.name)
    return out


def _hostile_checkpoint(tmp_path: Path) -> Path:
    """test.tiny as a Hugging Face directory whose architecture name is HTML."""
    from model_server.models import tiny

    out = tiny.save_hf(tmp_path / "hostile")
    cfg = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**cfg, "architectures": [HOSTILE]}))
    return out


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_pages_in_a_browser_follow_a_live_cell(tmp_path: Path, tiny_compiled: None, browser: Any) -> None:
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root")).start()
    ms = ModelServerProcess(tmp_path, admin=f"127.0.0.1:{admin.port}", env={"SAX_TAGS": "zone-a,spot"}).start()
    page = browser.new_page(viewport={"width": 1280, "height": 720})
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
    try:
        page.goto(admin.url + "/")
        assert page.inner_text("h1") == "Cell /sax/test"
        row = page.locator(f'#servers tr[data-server="{ms.address}"]')
        row.wait_for(timeout=20_000)
        assert "ALIVE" in row.inner_text() and "cpu" in row.inner_text()
        wait_until(lambda: "epoch" in page.inner_text("#leader"), timeout=20, what="leader on the page")
        page.evaluate("window.__sameDocument = true")

        # A publish shows up by itself, then becomes READY, without a reload.
        publish_and_wait(admin.url, "/sax/test/tiny")
        ready = page.locator('#models tr[data-model="/sax/test/tiny"]')
        ready.wait_for(timeout=10_000)
        wait_until(lambda: "READY" in ready.inner_text(), timeout=10, what="READY on the page")
        assert "1 / 1" in ready.inner_text() and "test.tiny" in ready.inner_text()

        # A load that fails: its error, verbatim and inert, on the cell and model pages.
        r = requests.post(f"{admin.url}/models", timeout=10, json={
            "model_id": "/sax/test/broken", "model_path": "lm.hf",
            "checkpoint": str(_hostile_checkpoint(tmp_path)), "replicas": 1})
        assert r.status_code == 201, r.text
        broken = page.locator('#models tr[data-model="/sax/test/broken"] td.error')
        wait_until(lambda: "unknown architecture" in broken.inner_text(), timeout=60, what="failure on the page")
        assert HOSTILE in broken.inner_text() and ms.address in broken.inner_text()
        assert page.evaluate("window.__sameDocument") is True, "the page reloaded"
        assert page.evaluate("window.__xss") is None and page.locator("main img").count() == 0
        _shot(page, tmp_path, "status-page")

        page.click('a[href="/model/sax/test/broken"]')
        page.wait_for_selector("#replicas")
        rep = page.locator(f'#replicas tr[data-server="{ms.address}"]')
        wait_until(lambda: "FAILED" in rep.inner_text(), timeout=30, what="replica FAILED")
        assert HOSTILE in page.inner_text("#last-error")
        assert "published" in page.inner_text("#changes")
        assert page.evaluate("window.__xss") is None
        _shot(page, tmp_path, "model-page")

        page.goto(f"{admin.url}/model/sax/test/tiny")
        tiny_row = page.locator(f'#replicas tr[data-server="{ms.address}"]')
        assert "LOADED" in tiny_row.inner_text() and " s" in tiny_row.inner_text()  # load time
        assert "MiB" in tiny_row.inner_text() or "KiB" in tiny_row.inner_text()  # memory

        page.click(f'a[href="/server/{ms.address}"]')
        page.wait_for_selector('#replicas tr[data-model="/sax/test/tiny"]')
        facts = page.inner_text(".facts")
        assert "zone-a" in facts and "spot" in facts and "test.tiny" in facts and "lm.hf" in facts
        assert page.locator(".facts meter").count() == 1
        _shot(page, tmp_path, "server-page")

        # The model server goes away: the cell page says so by itself.
        page.goto(admin.url + "/")
        ms.stop()
        wait_until(lambda: "DEAD" in page.inner_text("main") or "No model server" in page.inner_text("main"),
                   timeout=30, what="server dead or gone on the page")
        assert not [e for e in errors if "Content Security Policy" in e or "Uncaught" in e], errors
    finally:
        page.close()
        ms.stop()
        admin.stop()


@pytest.mark.slow
def test_browser_signs_in_with_the_admin_token(tmp_path: Path, browser: Any) -> None:
    token = "browser-admin-token"
    admin = AdminProcess(tmp_path, root=str(tmp_path / "root"), env={"SAX_ADMIN_TOKEN": token}).start()
    context = browser.new_context()
    page = context.new_page()
    try:
        page.goto(f"{admin.url}/server/10.0.0.9:1")
        assert page.url.startswith(f"{admin.url}/login")
        page.fill("input[name=token]", "wrong")
        page.click("button[type=submit]")
        assert "not this cell" in page.inner_text("#login-error")
        page.fill("input[name=token]", token)
        page.click("button[type=submit]")
        page.wait_for_url(f"{admin.url}/server/10.0.0.9:1")
        assert "Not found" in page.inner_text("h1")
        page.goto(admin.url + "/")
        assert page.inner_text("h1") == "Cell /sax/test"
        (cookie,) = context.cookies()
        assert cookie["httpOnly"] and token not in cookie["value"] and token not in page.url
        page.click("header button[type=submit]")  # sign out
        page.wait_for_url(f"{admin.url}/login")
        page.goto(admin.url + "/")
        assert page.url.startswith(f"{admin.url}/login")
    finally:
        context.close()
        admin.stop()
