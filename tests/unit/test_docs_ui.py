"""/docs (Swagger UI) and /redoc (ReDoc) need no network: every asset the pages reference is a
local path this app serves. With Debian's `chromium` installed, a headless browser that can
resolve no host but 127.0.0.1 renders both pages from a real HTTP server (DOM and screenshot);
skipped without it."""

from __future__ import annotations

import re
import shutil
import socket
import subprocess
import threading
import time
from html.parser import HTMLParser
from pathlib import Path

import httpx
import pytest

from cluster.config import MogeConfig
from cluster.serve.metrics.replica import ReplicaMetrics
from cluster.serve.ingress.http_app import build_http_app
from cluster.serve.openai_server import OpenAIServer, ServedModel
from tests.unit.test_openai_server import LetterTokenizer, ScriptedEngine, call, run

PAGES = ("/docs", "/redoc")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run",
                  "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1"]


def docs_app():
    cfg = MogeConfig.load(env={}, server={})
    engine = ScriptedEngine()
    return build_http_app(OpenAIServer(engine, ServedModel("m", LetterTokenizer(), 64), cfg.server, ReplicaMetrics("m")))


class _Refs(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag, attrs):
        self.refs += [v for k, v in attrs if k in ("src", "href") and v]


@pytest.mark.parametrize("page", PAGES)
def test_the_page_references_only_local_assets_and_each_is_served(page):
    app = docs_app()
    html = run(call(app, "GET", page, key=None))
    assert html.status_code == 200 and html.headers["content-type"].startswith("text/html")
    parser = _Refs()
    parser.feed(html.text)
    scripts = re.findall(r"""(?:url|src|href)\s*[:=]\s*['"]([^'"]+)['"]""", html.text)
    refs = set(parser.refs) | set(scripts)
    assert refs and all(r.startswith("/") for r in refs), refs
    assert "http://" not in html.text and "https://" not in html.text
    for ref in refs:
        r = run(call(app, "GET", ref, key=None))
        assert r.status_code == 200 and len(r.content) > 100, ref
        if ref.endswith(".js"):
            assert "javascript" in r.headers["content-type"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def served_docs():
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(docs_app(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(10)


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (apt-get install chromium)")
@pytest.mark.parametrize("page, rendered", [("/docs", r'class="opblock[ "].*?/v1/chat/completions'),
                                            ("/redoc", r"Create Response.*?Request Body schema")])
def test_headless_chromium_renders_the_page_offline(served_docs, tmp_path: Path, page, rendered):
    url = served_docs + page
    common = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=15000"]
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert re.search(rendered, dom.stdout, re.DOTALL), dom.stdout[:2000]
    shot = tmp_path / "page.png"
    subprocess.run([*common, f"--screenshot={shot}", "--window-size=1280,900", url],
                   capture_output=True, timeout=120, check=True)
    from matplotlib.image import imread

    pixels = imread(shot)
    assert pixels.shape[0] == 900 and pixels.reshape(-1, pixels.shape[-1]).std(axis=0).max() > 0.05  # not blank
