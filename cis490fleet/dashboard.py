"""``GET /``: the live dashboard, one self-contained page built from the package's static files.

Adapter for the HTTP API (registered through ``http_api.EXTENSIONS``). The page's
HTML, CSS and JS live in ``cis490fleet/static/`` and are read once through
``importlib.resources`` (so they are found inside the zipapp too). The CSS and JS
are inlined, and a Content-Security-Policy in the page allows exactly those two
by their hashes: no other script, style, frame, form target or outside
connection. (It sits in a <meta> element because extension handlers answer with
a plain (status, type, body) tuple.) The page only reads the JSON API;
operator actions send the token the user typed, which the page keeps in
sessionStorage and this module never sees.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources

from cis490fleet import errors

CSP_SLOT = "<!--{{csp}}-->"
CSS_SLOT = "/*{{css}}*/"
JS_SLOT = "/*{{js}}*/"
CONTENT_TYPE = "text/html; charset=utf-8"


def _hash_source(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode("utf-8")).digest()).decode() + "'"


def content_security_policy(css: str, js: str) -> str:
    return "; ".join((
        "default-src 'none'",
        f"script-src {_hash_source(js)}",
        f"style-src {_hash_source(css)}",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'none'",
    ))


def build_page(html: str, css: str, js: str) -> bytes:
    """The HTML with its CSP, ``css`` and ``js`` filled into their slots."""
    missing = [slot for slot in (CSP_SLOT, CSS_SLOT, JS_SLOT) if slot not in html]
    if missing:
        raise errors.ConfigError(f"dashboard.html lacks its {' and '.join(missing)} slot; the package is damaged: "
                                 "reinstall or rebuild cis490fleet")
    if "</style" in css.lower() or "</script" in js.lower():
        raise errors.ConfigError("dashboard.css or dashboard.js contains a closing tag and cannot be inlined")
    meta = ('<meta http-equiv="Content-Security-Policy" content="'
            + content_security_policy(css, js).replace("&", "&amp;").replace('"', "&quot;") + '">')
    return html.replace(CSP_SLOT, meta, 1).replace(CSS_SLOT, css, 1).replace(JS_SLOT, js, 1).encode("utf-8")


@functools.cache
def page() -> bytes:
    """The page, read from the package once."""
    static = importlib.resources.files("cis490fleet") / "static"
    try:
        html, css, js = ((static / name).read_text(encoding="utf-8")
                         for name in ("dashboard.html", "dashboard.css", "dashboard.js"))
    except OSError as err:
        raise errors.ConfigError(f"the dashboard's files are missing from the package ({err}); reinstall or "
                                 "rebuild cis490fleet") from None
    return build_page(html, css, js)


def index(req):
    return 200, CONTENT_TYPE, page()


def register(router) -> None:
    """Serve the dashboard at GET /."""
    router.add("GET", "/", index)
