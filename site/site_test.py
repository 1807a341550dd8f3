"""Open every page of the built book in headless Chromium, offline, and check it.

Usage: python site/site_test.py _build/html

Serves the site on 127.0.0.1, drives Chromium over its DevTools protocol
(websocket-client) and fails on: a console error or uncaught exception, a failed
request, a request leaving localhost, a broken image, unrendered math (a `.math`
element MathJax did not typeset, or raw `$...$` / `\\(` left in prose), or a chapter
page (NN_*.html) without its h1 and section headings. Screenshots go to
_build/screenshots/<page>.png. Installs Debian's chromium with apt-get if missing.
"""
import base64
import functools
import http.server
import json
import os
import pathlib
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

import websocket

CHROMIUM = "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions", "--mute-audio"]
WIDTH, HEIGHT, MAX_SHOT_HEIGHT = 1280, 900, 6000
PAGE_TIMEOUT_S = 60

# Run in the page once it has loaded and MathJax (if any) has finished typesetting.
CHECK_JS = r"""
(() => {
  const skip = 'pre, code, script, style, .cell_output, .output, mjx-container, .MathJax';
  const texts = [];
  const walker = document.createTreeWalker(document.querySelector('article') || document.body,
                                           NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (!n.parentElement.closest(skip)) texts.push(n.textContent);
  }
  const prose = texts.join(' ');
  const raw = [];
  for (const re of [/\\\(.{0,40}/g, /\\\[.{0,40}/g, /\$\$.{0,40}/g, /\$[^$\s][^$\n]{0,80}\$/g]) {
    for (const m of prose.matchAll(re)) raw.push(m[0]);
  }
  const maths = [...document.querySelectorAll('.math')];
  const article = document.querySelector('article') || document.body;
  return {
    title: document.title,
    h1: [...article.querySelectorAll('h1')].map(h => h.textContent.replace('#', '').trim()),
    h2: [...article.querySelectorAll('h2')].map(h => h.textContent.replace('#', '').trim()),
    brokenImages: [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))
                                      .map(i => i.getAttribute('src')),
    images: document.images.length,
    mathElements: maths.length,
    untypesetMath: maths.filter(m => !m.querySelector('mjx-container'))
                        .map(m => m.textContent.slice(0, 60)),
    mjx: document.querySelectorAll('mjx-container').length,
    mathjaxErrors: document.querySelectorAll('mjx-merror').length,
    rawMath: raw.slice(0, 5),
    height: Math.ceil(document.documentElement.scrollHeight),
  };
})()
"""

WAIT_MATHJAX_JS = """
(async () => {
  if (window.MathJax && MathJax.startup && MathJax.startup.promise) {
    await MathJax.startup.promise;
    return 'mathjax';
  }
  return 'none';
})()
"""


def ensure_chromium():
    if os.path.exists(CHROMIUM):
        return
    print("installing chromium with apt-get ...", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def serve(root):
    handler = functools.partial(QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


class Browser:
    """One headless Chromium with a fresh profile; one page target driven over CDP."""

    def __init__(self):
        self.profile = tempfile.mkdtemp(prefix="site-test-profile-")
        port = free_port()
        self.proc = subprocess.Popen(
            [CHROMIUM, *FLAGS, f"--user-data-dir={self.profile}",
             f"--remote-debugging-port={port}", f"--window-size={WIDTH},{HEIGHT}", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 30
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=2) as r:
                    pages = [t for t in json.load(r) if t["type"] == "page"]
                if pages:
                    break
            except OSError:
                pass
            if time.time() > deadline or self.proc.poll() is not None:
                raise RuntimeError("chromium did not start its DevTools endpoint")
            time.sleep(0.2)
        self.ws = websocket.create_connection(pages[0]["webSocketDebuggerUrl"], timeout=PAGE_TIMEOUT_S,
                                              suppress_origin=True)
        self.next_id = 0
        self.events = []
        for domain in ("Page", "Runtime", "Log", "Network"):
            self.call(f"{domain}.enable")
        self.call("Emulation.setDeviceMetricsOverride",
                  width=WIDTH, height=HEIGHT, deviceScaleFactor=1, mobile=False)

    def call(self, method, **params):
        self.next_id += 1
        my_id = self.next_id
        self.ws.send(json.dumps({"id": my_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == my_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            if "method" in msg:
                self.events.append(msg)

    def wait_event(self, method, timeout):
        deadline = time.time() + timeout
        while time.time() < deadline:
            for i, e in enumerate(self.events):
                if e["method"] == method:
                    return self.events.pop(i)
            self.ws.settimeout(max(0.1, deadline - time.time()))
            try:
                msg = json.loads(self.ws.recv())
            except websocket.WebSocketTimeoutException:
                break
            finally:
                self.ws.settimeout(PAGE_TIMEOUT_S)
            if "method" in msg:
                self.events.append(msg)
        raise TimeoutError(f"no {method} within {timeout} s")

    def evaluate(self, expression, await_promise=False):
        r = self.call("Runtime.evaluate", expression=expression, returnByValue=True,
                      awaitPromise=await_promise)
        if "exceptionDetails" in r:
            raise RuntimeError(f"page script failed: {r['exceptionDetails']}")
        return r["result"].get("value")

    def drain(self, seconds):
        """Collect events for a little while (late console messages, image loads)."""
        self.ws.settimeout(seconds)
        try:
            while True:
                msg = json.loads(self.ws.recv())
                if "method" in msg:
                    self.events.append(msg)
        except websocket.WebSocketTimeoutException:
            pass
        finally:
            self.ws.settimeout(PAGE_TIMEOUT_S)

    def close(self):
        try:
            self.ws.close()
        finally:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
            shutil.rmtree(self.profile, ignore_errors=True)


def problems_from_events(events, origin):
    out = []
    for e in events:
        m, p = e["method"], e["params"]
        if m == "Runtime.consoleAPICalled" and p["type"] in ("error", "assert"):
            text = " ".join(str(a.get("value", a.get("description", ""))) for a in p["args"])
            out.append(f"console.{p['type']}: {text[:200]}")
        elif m == "Runtime.exceptionThrown":
            d = p["exceptionDetails"]
            desc = d.get("exception", {}).get("description") or d.get("text")
            out.append(f"uncaught exception: {str(desc)[:200]}")
        elif m == "Log.entryAdded" and p["entry"]["level"] == "error" \
                and not p["entry"].get("url", "").endswith("/favicon.ico"):
            out.append(f"log error: {p['entry']['text'][:200]} {p['entry'].get('url', '')}")
        elif m == "Network.loadingFailed" and not p.get("canceled"):
            out.append(f"request failed: {p.get('errorText')} (requestId {p['requestId']})")
        elif m == "Network.requestWillBeSent":
            url = p["request"]["url"]
            if not url.startswith((origin, "data:", "blob:", "about:")):
                out.append(f"request leaves the site: {url[:200]}")
        elif m == "Network.responseReceived" and p["response"]["status"] >= 400 \
                and not p["response"]["url"].endswith("/favicon.ico"):
            out.append(f"HTTP {p['response']['status']}: {p['response']['url']}")
    return out


def check_page(browser, origin, rel, shots):
    browser.events.clear()
    browser.call("Page.navigate", url=f"{origin}/{rel}")
    browser.wait_event("Page.loadEventFired", PAGE_TIMEOUT_S)
    engine = browser.evaluate(WAIT_MATHJAX_JS, await_promise=True)
    browser.drain(0.5)
    info = browser.evaluate(CHECK_JS)
    problems = problems_from_events(browser.events, origin)
    if info["brokenImages"]:
        problems.append(f"broken images: {info['brokenImages']}")
    if info["mathElements"] and engine != "mathjax":
        problems.append(f"{info['mathElements']} math elements but MathJax did not load")
    if info["untypesetMath"]:
        problems.append(f"math not typeset: {info['untypesetMath'][:3]}")
    if info["mathjaxErrors"]:
        problems.append(f"{info['mathjaxErrors']} MathJax errors (mjx-merror)")
    if info["rawMath"]:
        problems.append(f"raw TeX left in the text: {info['rawMath']}")
    name = pathlib.PurePosixPath(rel).name
    if name[:2].isdigit() and name[2] == "_" and (not info["h1"] or not info["h2"]):
        problems.append(f"chapter page without headings: h1={info['h1']} h2={info['h2']}")
    height = min(max(info["height"], HEIGHT), MAX_SHOT_HEIGHT)
    shot = browser.call("Page.captureScreenshot", format="png", captureBeyondViewport=True,
                        clip={"x": 0, "y": 0, "width": WIDTH, "height": height, "scale": 1})
    out = shots / (rel.replace("/", "__").removesuffix(".html") + ".png")
    out.write_bytes(base64.b64decode(shot["data"]))
    return info, problems


def main(argv):
    if len(argv) != 2:
        raise SystemExit("usage: python site/site_test.py _build/html")
    root = pathlib.Path(argv[1]).resolve()
    if not (root / "index.html").is_file():
        raise SystemExit(f"{root} has no index.html: run `make book` first")
    shots = root.parent / "screenshots"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    pages = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html")
                   if not p.relative_to(root).parts[0].startswith("_"))
    ensure_chromium()
    server = serve(root)
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    browser = Browser()
    failed = 0
    start = time.time()
    try:
        for rel in pages:
            info, problems = check_page(browser, origin, rel, shots)
            status = "FAIL" if problems else "ok"
            print(f"{status:4} {rel:40} h2={len(info['h2']):2} images={info['images']:2} "
                  f"math={info['mathElements']:3} typeset={info['mjx']:3}", flush=True)
            for p in problems:
                print(f"     - {p}")
            failed += bool(problems)
    finally:
        browser.close()
        server.shutdown()
    print(f"{len(pages) - failed}/{len(pages)} pages ok in {time.time() - start:.1f} s; "
          f"screenshots in {shots}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
