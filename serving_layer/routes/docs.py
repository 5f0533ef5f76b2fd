"""``GET /docs`` (Swagger UI) and ``GET /redoc`` over the service's OpenAPI document, with
their scripts, styles and icon served by the service itself under ``/docs-assets``.

FastAPI's own pages load Swagger UI and ReDoc from a CDN, so on a machine without Internet
access they stay blank. The files here come from the ``fastapi-offline`` package, whose
``static`` folder ships Swagger UI 5 and ReDoc 2 (both render the OpenAPI 3.1 that FastAPI
writes; ``swagger-ui-bundle`` still ships Swagger UI 4, which cannot). Only that folder is used:
the pages are built with FastAPI's documented ``get_swagger_ui_html`` / ``get_redoc_html``.
"""

from __future__ import annotations

from importlib import resources

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

DOCS_URL = "/docs"
REDOC_URL = "/redoc"
ASSETS_URL = "/docs-assets"
# ReDoc's footer shows Redocly's logo from their CDN: the pages may show images from the service
# only (and inline ones), so they send no request anywhere else.
IMAGES_FROM_SELF = {"Content-Security-Policy": "img-src 'self' data: blob:"}


def assets_folder() -> str:
    """The folder of Swagger UI's and ReDoc's files (``swagger-ui-bundle.js``,
    ``swagger-ui.css``, ``redoc.standalone.js``, ``favicon.png``) in the installed package."""
    folder = resources.files("fastapi_offline") / "static"
    if not folder.is_dir():
        raise RuntimeError(f"the fastapi-offline package has no {folder}: reinstall it (pip install -e .)")
    return str(folder)


def mount_docs(app: FastAPI) -> None:
    """Serve ``/docs`` and ``/redoc`` for ``app`` from local files. ``app`` must be created with
    ``docs_url=None, redoc_url=None`` (FastAPI's CDN pages would otherwise answer first)."""
    if app.docs_url is not None or app.redoc_url is not None:
        raise ValueError("mount_docs: create the app with docs_url=None and redoc_url=None")
    openapi_url = app.openapi_url
    if openapi_url is None:
        raise ValueError("mount_docs: the app has no OpenAPI document (openapi_url=None)")
    app.mount(ASSETS_URL, StaticFiles(directory=assets_folder()), name="docs-assets")

    @app.get(DOCS_URL, include_in_schema=False)
    def swagger_ui(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")  # behind a proxy serving the app under a prefix
        page = get_swagger_ui_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - Swagger UI",
            swagger_js_url=f"{root}{ASSETS_URL}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS_URL}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            # Swagger UI would otherwise ask validator.swagger.io about the document.
            swagger_ui_parameters={"validatorUrl": None},
        )
        page.headers.update(IMAGES_FROM_SELF)
        return page

    @app.get(REDOC_URL, include_in_schema=False)
    def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        page = get_redoc_html(
            openapi_url=f"{root}{openapi_url}",
            title=f"{app.title} - ReDoc",
            redoc_js_url=f"{root}{ASSETS_URL}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS_URL}/favicon.png",
            with_google_fonts=False,
        )
        page.headers.update(IMAGES_FROM_SELF)
        return page
