"""The /docs page: Swagger UI for /openapi.json, served by tfserver itself (no CDN).

Swagger UI's files come from the swagger-ui-bundle-v2 package (Swagger UI 5, which reads
OpenAPI 3.1); the page and its initializer are tfserver's own, so the page runs no inline
script and its Content-Security-Policy allows scripts, styles and requests from this
origin only (plus the token endpoint, which the browser asks for client-credentials
tokens). Only the files named here are served: no path from a request reaches the file
system.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

#: Swagger UI's files tfserver serves, by name, with their types.
VENDOR_FILES = {
    "swagger-ui.css": "text/css; charset=utf-8",
    "swagger-ui-bundle.js": "text/javascript; charset=utf-8",
    "index.css": "text/css; charset=utf-8",
    "favicon-32x32.png": "image/png",
    "favicon-16x16.png": "image/png",
    "oauth2-redirect.html": "text/html; charset=utf-8",
    "oauth2-redirect.js": "text/javascript; charset=utf-8",
}

PAGE = """<!DOCTYPE html>
<html lang="en">
  <head>
    <meta charset="UTF-8">
    <title>tfserver API</title>
    <link rel="stylesheet" type="text/css" href="/docs/swagger-ui.css">
    <link rel="stylesheet" type="text/css" href="/docs/index.css">
    <link rel="icon" type="image/png" href="/docs/favicon-32x32.png" sizes="32x32">
    <link rel="icon" type="image/png" href="/docs/favicon-16x16.png" sizes="16x16">
  </head>
  <body>
    <div id="swagger-ui"></div>
    <script src="/docs/swagger-ui-bundle.js" charset="UTF-8"></script>
    <script src="/docs/init.js" charset="UTF-8"></script>
  </body>
</html>
"""

INITIALIZER = """// tfserver's Swagger UI initializer, a file of its own so that the page needs no
// inline script. The document shows only the modules the caller may read: once the
// caller authorizes, it is fetched again with the token.
(function () {
  "use strict";

  function bearer(system) {
    var found = system.authSelectors.authorized();
    var auth = found && found.toJS ? found.toJS() : {};
    if (auth.oauth2 && auth.oauth2.token && auth.oauth2.token.access_token) {
      return auth.oauth2.token.access_token;
    }
    return auth.bearer && auth.bearer.value ? auth.bearer.value : null;
  }

  function ReloadOnAuth(system) {
    function again(action) {
      return function () {
        var result = action.apply(null, arguments);
        window.setTimeout(function () { system.specActions.download("/openapi.json"); }, 0);
        return result;
      };
    }
    return {statePlugins: {auth: {wrapActions: {
      authorize: again, authorizeOauth2: again, logout: again
    }}}};
  }

  window.addEventListener("load", function () {
    window.ui = SwaggerUIBundle({
      url: "/openapi.json",
      dom_id: "#swagger-ui",
      deepLinking: true,
      persistAuthorization: false,
      oauth2RedirectUrl: window.location.origin + "/docs/oauth2-redirect.html",
      presets: [SwaggerUIBundle.presets.apis],
      plugins: [ReloadOnAuth],
      layout: "BaseLayout",
      requestInterceptor: function (request) {
        var token = request.loadSpec && window.ui ? bearer(window.ui) : null;
        if (token) {
          request.headers.Authorization = "Bearer " + token;
        }
        return request;
      }
    });
  });
})();
"""


@dataclass(frozen=True)
class Asset:
    """One file of the page: its bytes, type and whether browsers may keep it."""

    data: bytes
    content_type: str
    cacheable: bool = False


def vendor_folder() -> Path | None:
    """Where the installed Swagger UI's files are, or None when the package is missing."""
    try:
        # Imported by name: the package ships no type information.
        bundle = importlib.import_module("swagger_ui_bundle")
    except ImportError:
        return None
    return Path(str(bundle.swagger_ui_path))


def asset(name: str) -> Asset | None:
    """The file served at `/docs/<name>` (`""`: the page), or None if there is none."""
    if name in ("", "index.html"):
        return Asset(PAGE.encode(), "text/html; charset=utf-8")
    if name == "init.js":
        return Asset(INITIALIZER.encode(), "text/javascript; charset=utf-8")
    kind = VENDOR_FILES.get(name)
    folder = vendor_folder()
    if kind is None or folder is None:
        return None
    try:
        return Asset((folder / name).read_bytes(), kind, cacheable=True)
    except OSError:
        return None


def content_security_policy(token_url: str = "") -> str:
    """The page's policy: everything from this origin only; requests also to the token
    endpoint's origin; no inline script, no framing, no plugins."""
    connect = "'self'"
    parts = urlsplit(token_url)
    if parts.scheme in ("https", "http") and parts.netloc:
        connect += f" {parts.scheme}://{parts.netloc}"
    return ("default-src 'none'; script-src 'self'; style-src 'self'; "
            "img-src 'self' data:; font-src 'self' data:; "
            f"connect-src {connect}; form-action 'self'; frame-ancestors 'none'; "
            "base-uri 'none'")
