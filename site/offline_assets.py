"""Serve MathJax 3 from the site itself (no CDN), so equations render offline.

MathJax comes from the pinned PyPI package sphinx-mathjax-offline (its static/mathjax
tree); it is copied to _build/html/_static/mathjax at the end of the build. The
ipywidgets embed renderer (require.js + @jupyter-widgets/html-manager) is only
published on npm: when `npm` is on PATH the pinned tarballs are fetched once with
`npm pack` into _build/.widget-assets and served from _static/widgets; without npm
(or if that fails) the CDN script tags are dropped and widget cells show their
static text fallback and the figure beside them. Never a build failure.

Two page fixes found by site/site_test.py in headless Chromium: sphinx-thebe's inline
config script is registered twice (a SyntaxError on every page: `THEBE_JS_URL` already
declared), and the theme's `default_mode` is empty ("Got invalid theme mode" console
error on a first visit).
"""
import importlib.metadata
import os
import shutil
import subprocess
import tarfile

from sphinx.util import logging
from sphinx.util.fileutil import copy_asset

MATHJAX_PATH = "mathjax/tex-chtml.js"
NPM_PACKAGES = {"@jupyter-widgets/html-manager@1.0.12": "jupyter-widgets-html-manager-1.0.12.tgz",
                "requirejs@2.3.7": "requirejs-2.3.7.tgz"}
logger = logging.getLogger(__name__)
# embed-amd.js loads its chunks and fonts through require.js as
# "@jupyter-widgets/html-manager/dist/..."; point that id at _static/widgets.
REQUIRE_CONFIG_JS = """(function () {
  var base = document.currentScript.src.replace(/\\/[^\\/]*$/, "");
  require.config({paths: {"@jupyter-widgets/html-manager/dist": base}});
})();
"""


def _widget_assets(cache):
    """Directory holding require.js and embed-amd.js, fetched with npm; None if unavailable."""
    done = os.path.join(cache, "widgets")
    if os.path.isfile(os.path.join(done, "embed-amd.js")):
        return done
    if shutil.which("npm") is None:
        logger.info("offline_assets: npm not found; widgets use their static fallback")
        return None
    try:
        os.makedirs(cache, exist_ok=True)
        subprocess.run(["npm", "pack", "--silent", *NPM_PACKAGES], cwd=cache, check=True,
                       timeout=300, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tmp = done + ".tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        with tarfile.open(os.path.join(cache, NPM_PACKAGES["@jupyter-widgets/html-manager@1.0.12"])) as t:
            for m in t.getmembers():
                if m.isfile() and m.name.startswith("package/dist/") and "/" not in m.name[13:] \
                        and not m.name.endswith(".map"):
                    m.name = m.name[13:]
                    t.extract(m, tmp)
        with tarfile.open(os.path.join(cache, NPM_PACKAGES["requirejs@2.3.7"])) as t:
            m = t.getmember("package/require.js")
            m.name = "require.js"
            t.extract(m, tmp)
        os.replace(tmp, done)
        return done
    except (OSError, subprocess.SubprocessError, tarfile.TarError, KeyError) as e:
        logger.info(f"offline_assets: widget assets unavailable ({e}); static fallback")
        return None


def _mathjax_dir():
    dist = importlib.metadata.distribution("sphinx-mathjax-offline")
    for f in dist.files:
        if str(f).endswith("static/mathjax/tex-chtml.js"):
            return os.path.dirname(os.path.abspath(dist.locate_file(f)))
    raise FileNotFoundError("sphinx-mathjax-offline has no static/mathjax/tex-chtml.js")


def _config_inited(app, config):
    config.mathjax_path = MATHJAX_PATH
    widgets = _widget_assets(os.path.join(os.path.dirname(app.outdir), ".widget-assets"))
    app.offline_widgets = widgets
    config.nb_ipywidgets_js = {} if widgets is None else {
        "widgets/require.js": {},
        "widgets/require-config.js": {},
        "widgets/embed-amd.js": {"data-jupyter-widgets-cdn": "widgets/"},
    }


def _copy(app, exc):
    if exc is None and app.builder.format == "html":
        copy_asset(_mathjax_dir(), os.path.join(app.outdir, "_static", "mathjax"))
        if getattr(app, "offline_widgets", None):
            dest = os.path.join(app.outdir, "_static", "widgets")
            copy_asset(app.offline_widgets, dest)
            with open(os.path.join(dest, "require-config.js"), "w") as f:
                f.write(REQUIRE_CONFIG_JS)
            # Seen in Chromium: the fonts' public path sometimes resolves to
            # <page dir>/@jupyter-widgets/ instead (a race in embed-amd.js); serve them there too.
            fonts = os.path.join(app.outdir, "@jupyter-widgets")
            os.makedirs(fonts, exist_ok=True)
            for name in os.listdir(app.offline_widgets):
                if name.endswith((".woff2", ".woff", ".ttf", ".eot", ".svg")):
                    shutil.copy(os.path.join(app.offline_widgets, name), fonts)


def _page_context(app, pagename, templatename, context, doctree):
    seen, unique = set(), []
    for js in context.get("script_files", []):
        attrs = getattr(js, "attributes", {})
        key = (getattr(js, "filename", str(js)) or "", repr(sorted((k, str(v)) for k, v in attrs.items())))
        if key not in seen:
            seen.add(key)
            unique.append(js)
    context["script_files"][:] = unique
    if not context.get("default_mode"):
        context["default_mode"] = "light"


def setup(app):
    app.connect("html-page-context", _page_context, priority=900)
    app.connect("config-inited", _config_inited)
    app.connect("build-finished", _copy)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
