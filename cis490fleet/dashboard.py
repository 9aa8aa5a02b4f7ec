"""``GET /``: the live dashboard, one self-contained page built from the package's static files.

Adapter for the HTTP API (registered through ``http_api.EXTENSIONS``). The page's
HTML, CSS and JS live in ``cis490fleet/static/`` and are read once through
``importlib.resources`` (so they are found inside the zipapp too). The CSS and JS
are inlined, and the Content-Security-Policy header, computed once with the page,
allows exactly those two by their hashes: no other script, style, form target or
outside connection, and no framing of the page by anyone. The page only reads the
JSON API; operator actions send the token the user typed, which the page keeps in
sessionStorage and this module never sees.
"""

from __future__ import annotations

import base64
import functools
import hashlib
import importlib.resources

from cis490fleet import errors

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
        "frame-ancestors 'none'",
    ))


def build_page(html: str, css: str, js: str) -> tuple[bytes, dict[str, str]]:
    """The HTML with ``css`` and ``js`` filled into their slots, and the headers to send with it."""
    missing = [slot for slot in (CSS_SLOT, JS_SLOT) if slot not in html]
    if missing:
        raise errors.ConfigError(f"dashboard.html lacks its {' and '.join(missing)} slot; the package is damaged: "
                                 "reinstall or rebuild cis490fleet")
    if "</style" in css.lower() or "</script" in js.lower():
        raise errors.ConfigError("dashboard.css or dashboard.js contains a closing tag and cannot be inlined")
    headers = {"Content-Security-Policy": content_security_policy(css, js), "X-Content-Type-Options": "nosniff",
               "Referrer-Policy": "no-referrer"}
    return html.replace(CSS_SLOT, css, 1).replace(JS_SLOT, js, 1).encode("utf-8"), headers


@functools.cache
def _built() -> tuple[bytes, dict[str, str]]:
    static = importlib.resources.files("cis490fleet") / "static"
    try:
        html, css, js = ((static / name).read_text(encoding="utf-8")
                         for name in ("dashboard.html", "dashboard.css", "dashboard.js"))
    except OSError as err:
        raise errors.ConfigError(f"the dashboard's files are missing from the package ({err}); reinstall or "
                                 "rebuild cis490fleet") from None
    return build_page(html, css, js)


def page() -> bytes:
    """The page, read from the package once."""
    return _built()[0]


def headers() -> dict[str, str]:
    """The page's security headers (its CSP holds the hashes of the inlined CSS and JS)."""
    return dict(_built()[1])


def index(req):
    return 200, CONTENT_TYPE, page(), headers()


def register(router) -> None:
    """Serve the dashboard at GET /."""
    router.add("GET", "/", index)
