"""Open every page of the built book in headless Chromium, offline, and check what a reader sees.

Usage: python site/site_test.py [--if-chromium] _build/html [PAGE.html ...]

Serves the site on 127.0.0.1 and drives Chromium over its DevTools protocol (websocket-client),
in a 1280 x 900 window and again at 800 px. Fails on: a console error or uncaught exception, a
failed request or one leaving localhost, a broken image, math MathJax did not typeset, raw TeX
or a `$` left in the prose, prose swallowed into math (plain words in the typeset TeX), code or
output blocks, tables or display equations wider than their column (`scrollWidth`), figures on a
chapter page shown below 70% of their natural width, the same image twice in a row, a chapter
page (NN_*.html) without its h1 and section headings. Before the book, a self-check page with
one of each defect must trip every check. Screenshots of each page as the window shows it
(screen by screen, stacked) go to _build/screenshots/<page>.png and <page>@800.png.

Installs Debian's chromium with apt-get if missing; with --if-chromium, where it cannot (no
root), prints that the browser checks were skipped and how to run them, and exits 0.
"""
import base64
import functools
import io
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
from PIL import Image

CHROMIUM = os.environ.get("SITE_TEST_CHROMIUM", "/usr/bin/chromium")  # the path apt-get installs to
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run",
         "--disable-default-apps", "--disable-extensions", "--mute-audio"]
WIDTH, HEIGHT, MAX_SHOT_HEIGHT = 1280, 900, 50000
WIDTHS = (WIDTH, 800)   # the window a reader on a laptop has, and a narrow one
PAGE_TIMEOUT_S = 60

# Run in the page once it has loaded and MathJax (if any) has finished typesetting.
CHECK_JS = r"""
(() => {
  const article = document.querySelector('article') || document.body;
  const skip = 'pre, code, script, style, .cell_output, .output, mjx-container, .MathJax';
  const texts = [];
  const walker = document.createTreeWalker(article, NodeFilter.SHOW_TEXT);
  for (let n = walker.nextNode(); n; n = walker.nextNode()) {
    if (!n.parentElement.closest(skip)) texts.push(n.textContent);
  }
  const prose = texts.join(' ');
  const raw = [];
  for (const re of [/\\\(.{0,40}/g, /\\\[.{0,40}/g, /.{0,30}\$.{0,30}/g]) {
    for (const m of prose.matchAll(re)) raw.push(m[0]);
  }
  // Prose swallowed into math: the TeX MathJax typeset holds plain words (runs of four or more
  // letters that are not a \command and not inside \text{...}, \mathrm{...} and the like).
  const tex = (window.MathJax && MathJax.startup && MathJax.startup.document)
    ? [...MathJax.startup.document.math].map(m => m.math) : [];
  const textual = /\\(begin|end|text|mathrm|operatorname|mathtt|texttt|mbox|textrm|mathit|textit)\s*\{[^{}]*\}/g;
  const words = tex.map(t => [t, t.replace(textual, ' ').replace(/\\[A-Za-z]+/g, ' ').match(/[A-Za-z]{4,}/g)])
                   .filter(([t, w]) => w)
                   .map(([t, w]) => `${w.slice(0, 3).join(' ')} in "${t.slice(0, 60)}"`);
  const maths = [...document.querySelectorAll('.math')];
  const describe = e => (e.textContent || '').trim().replace(/\s+/g, ' ').slice(0, 50);
  // Code and output blocks whose lines run past their box (the reader would have to scroll).
  const blocks = [...article.querySelectorAll('pre')].filter(e => e.offsetParent !== null);
  const overflow = blocks.filter(e => e.scrollWidth > e.clientWidth + 1)
                         .map(e => `${e.scrollWidth}>${e.clientWidth} px: "${describe(e)}"`);
  const column = article.clientWidth;
  const wideMath = [...article.querySelectorAll('mjx-container[display="true"]')]
    .filter(m => m.scrollWidth > m.clientWidth + 1
                 || m.getBoundingClientRect().right > article.getBoundingClientRect().right + 1)
    .map(m => `${m.scrollWidth}>${m.clientWidth} px: "${describe(m)}"`);
  const tables = [...article.querySelectorAll('table')]
    .filter(t => t.getBoundingClientRect().width > column + 1 || t.scrollWidth > t.clientWidth + 1
                 || (t.parentElement && t.parentElement.scrollWidth > t.parentElement.clientWidth + 1))
    .map(t => `${Math.round(t.getBoundingClientRect().width)} px in a ${column} px column: "${describe(t)}"`);
  const imgs = [...article.querySelectorAll('img')];
  const shrunk = imgs.filter(i => i.naturalWidth > 0 && i.clientWidth < 0.7 * i.naturalWidth)
    .map(i => `${i.getAttribute('src').split('/').pop().slice(0, 16)} shown at ${i.clientWidth}`
              + ` of ${i.naturalWidth} px`);
  // Two images in a row with nothing but whitespace or output boxes between them, same file.
  const doubled = [];
  for (let k = 1; k < imgs.length; k++) {
    if (imgs[k].getAttribute('src') !== imgs[k - 1].getAttribute('src')) continue;
    const range = document.createRange();
    range.setStartAfter(imgs[k - 1]);
    range.setEndBefore(imgs[k]);
    const between = range.cloneContents();
    if (!between.querySelector('h1, h2, h3, h4, p, pre, table, li') && !between.textContent.trim())
      doubled.push(imgs[k].getAttribute('src').split('/').pop().slice(0, 16));
  }
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
    proseInMath: words.slice(0, 5),
    overflow: overflow,
    wideTables: tables,
    wideMath: wideMath,
    shrunkImages: shrunk,
    doubledImages: doubled,
    column: column,
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


def ensure_chromium(optional=False):
    """True once Chromium is at CHROMIUM: installs Debian's with apt-get if missing (as root, or
    with a sudo that asks no password). With ``optional``, False where it cannot be installed."""
    if os.path.exists(CHROMIUM):
        return True
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    if sudo and shutil.which("sudo") is None or shutil.which("apt-get") is None:
        if optional:
            return False
        raise SystemExit(f"{CHROMIUM} is missing and cannot be installed here (needs apt-get as root)")
    print("installing chromium with apt-get ...", flush=True)
    try:
        subprocess.run(sudo + ["apt-get", "update", "-qq"], check=True, env=env)
        subprocess.run(sudo + ["apt-get", "install", "-y", "-qq", "chromium"], check=True, env=env)
    except subprocess.CalledProcessError:
        if optional and sudo:
            return False
        raise
    return True


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


def screenshot(browser, height):
    """The page as a window of the current size shows it: one viewport capture per screenful,
    scrolled with window.scrollTo, so the fixed sidebars stand where a reader sees them; stacked
    into one tall PNG. The sticky bar atop the article would cover the first lines of every later
    screen, so those are taken one bar-height short and pasted below it."""
    width, view, bar = browser.evaluate(
        "[window.innerWidth, window.innerHeight, document.querySelector('.bd-header-article')?.offsetHeight ?? 0]")
    height = min(height, MAX_SHOT_HEIGHT)
    sheet = Image.new("RGB", (width, height), "white")
    top = 0
    while True:
        browser.evaluate(f"window.scrollTo(0, {top})")
        browser.drain(0.1)
        shown = browser.evaluate("window.scrollY")  # the last screen stops at the page's end
        shot = Image.open(io.BytesIO(base64.b64decode(browser.call("Page.captureScreenshot", format="png")["data"])))
        skip = 0 if top == 0 else bar
        sheet.paste(shot.crop((0, skip, width, view)), (0, round(shown) + skip))
        if top + view >= height:
            break
        top += view - bar
    browser.evaluate("window.scrollTo(0, 0)")
    return sheet


def load(browser, origin, rel, width):
    browser.call("Emulation.setDeviceMetricsOverride", width=width, height=HEIGHT, deviceScaleFactor=1,
                 mobile=False)
    browser.events.clear()
    browser.call("Page.navigate", url=f"{origin}/{rel}")
    browser.wait_event("Page.loadEventFired", PAGE_TIMEOUT_S)
    engine = browser.evaluate(WAIT_MATHJAX_JS, await_promise=True)
    browser.drain(0.5)
    return engine, browser.evaluate(CHECK_JS)


# CHECK_JS's lists -> what a problem with a non-empty list says. All at the 1280 px window;
# CHAPTER_CHECKS only on chapter pages; LAYOUT_CHECKS again at every width.
PAGE_CHECKS = {"brokenImages": "broken images", "untypesetMath": "math not typeset",
               "rawMath": "raw TeX or a $ left in the text", "proseInMath": "prose typeset as math",
               "doubledImages": "the same image twice in a row"}
CHAPTER_CHECKS = {"shrunkImages": "figures shown below 70% of their width"}
LAYOUT_CHECKS = {"overflow": "code or output wider than its box", "wideTables": "tables wider than the column",
                 "wideMath": "display equations wider than the column"}


def check_page(browser, origin, rel, shots=None):
    """Every check at the 1280 px window, the layout checks again at 800 px; a screenshot of each
    under ``shots`` (none if None)."""
    name = pathlib.PurePosixPath(rel).name
    chapter = name[:2].isdigit() and name[2] == "_"
    problems = []
    for width in WIDTHS:
        engine, info = load(browser, origin, rel, width)
        at = f"at {width} px: "
        if width == WIDTH:
            first = info
            problems += problems_from_events(browser.events, origin)
            if info["mathElements"] and engine != "mathjax":
                problems.append(f"{info['mathElements']} math elements but MathJax did not load")
            if info["mathjaxErrors"]:
                problems.append(f"{info['mathjaxErrors']} MathJax errors (mjx-merror)")
            if chapter and (not info["h1"] or not info["h2"]):
                problems.append(f"chapter page without headings: h1={info['h1']} h2={info['h2']}")
            checks = {**PAGE_CHECKS, **(CHAPTER_CHECKS if chapter else {})}
            problems += [f"{what}: {info[key][:5]}" for key, what in checks.items() if info[key]]
        problems += [at + f"{len(info[key])} {what}: {info[key][:4]}"
                     for key, what in LAYOUT_CHECKS.items() if info[key]]
        if shots is not None:
            suffix = "" if width == WIDTH else f"@{width}"
            out = shots / (rel.replace("/", "__").removesuffix(".html") + suffix + ".png")
            screenshot(browser, info["height"]).save(out)
    return first, problems


# A page with one of each defect the checks look for; every check must fire on it (a check that
# cannot fail would pass any site). Served beside the book so it loads the book's own MathJax.
SELF_CHECK_PAGE = "99_self_check.html"
SELF_CHECK_HTML = """<!DOCTYPE html><html><head><meta charset="utf-8"><title>self-check</title>
<script defer src="_static/mathjax/tex-chtml.js"></script>
<style>article {{ width: 600px; }} pre {{ width: 300px; overflow: auto; }}</style></head>
<body><article><h1>Self-check</h1><h2>Every defect once</h2>
<p>A dollar sign left over: $ and so on.</p>
<p><span class="math notranslate nohighlight">\\(x + If one draft call costs\\)</span></p>
<div class="math notranslate nohighlight">\\[{wide}\\]</div>
<pre>{long_line}</pre>
<table><tr><td style="white-space: nowrap">{long_line}</td></tr></table>
<p><img src="_self_check.png" style="width: 100px"><img src="_self_check.png" style="width: 100px"></p>
</article></body></html>
"""
SELF_CHECK_EXPECT = [PAGE_CHECKS[k] for k in ("rawMath", "proseInMath", "doubledImages")] \
    + list(CHAPTER_CHECKS.values()) + list(LAYOUT_CHECKS.values())


def self_check(browser, origin, root):
    """Run check_page on SELF_CHECK_PAGE; the messages of the checks that did not fire."""
    Image.new("RGB", (400, 50), "gray").save(root / "_self_check.png")
    wide = "\\begin{aligned}" + " + ".join(f"x_{{{i}}}" for i in range(80)) + "\\end{aligned}"
    (root / SELF_CHECK_PAGE).write_text(SELF_CHECK_HTML.format(wide=wide, long_line="x" * 200))
    try:
        _, problems = check_page(browser, origin, SELF_CHECK_PAGE)
    finally:
        (root / SELF_CHECK_PAGE).unlink()
        (root / "_self_check.png").unlink()
    return [text for text in SELF_CHECK_EXPECT if not any(text in p for p in problems)]


def main(argv):
    optional = "--if-chromium" in argv
    argv = [a for a in argv if a != "--if-chromium"]
    if len(argv) < 2:
        raise SystemExit("usage: python site/site_test.py [--if-chromium] _build/html [PAGE.html ...]")
    root = pathlib.Path(argv[1]).resolve()
    if not (root / "index.html").is_file():
        raise SystemExit(f"{root} has no index.html: run `make book` first")
    shots = root.parent / "screenshots"
    shutil.rmtree(shots, ignore_errors=True)
    shots.mkdir(parents=True)
    pages = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.html")
                   if not p.relative_to(root).parts[0].startswith("_")
                   and (len(argv) == 2 or p.relative_to(root).as_posix() in argv[2:]))
    if not ensure_chromium(optional):
        print(f"SKIPPED the browser checks of the built site: no {CHROMIUM}, and apt-get could not install it\n"
              f"(it needs root). To run them: sudo apt-get install chromium && make site-test")
        return 0
    server = serve(root)
    origin = f"http://127.0.0.1:{server.server_address[1]}"
    browser = Browser()
    failed = 0
    start = time.time()
    try:
        missed = self_check(browser, origin, root)
        print(f"{'FAIL' if missed else 'ok':4} {SELF_CHECK_PAGE:40} (every check fires on a page with each defect)")
        if missed:
            print(f"     - checks that did not fire: {missed}")
        for rel in pages:
            info, problems = check_page(browser, origin, rel, shots)
            status = "FAIL" if problems else "ok"
            print(f"{status:4} {rel:40} h2={len(info['h2']):2} images={info['images']:2} "
                  f"math={info['mathElements']:3} typeset={info['mjx']:3} column={info['column']} px", flush=True)
            for p in problems:
                print(f"     - {p}")
            failed += bool(problems)
    finally:
        browser.close()
        server.shutdown()
    print(f"{len(pages) - failed}/{len(pages)} pages ok in {time.time() - start:.1f} s; "
          f"screenshots in {shots}")
    return 1 if failed or missed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
