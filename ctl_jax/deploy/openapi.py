"""The OpenAPI 3.1 document of the search service (`GET /openapi.json`) and the small page
that lists it (`GET /docs`, self-contained: no scripts or styles from elsewhere).

Written out here rather than generated: the routes take raw image bodies and multipart
uploads, which a generator would have to be told about anyway, and the document stays
readable as the reference of the API.
"""

from __future__ import annotations

import html

_ERROR = {"$ref": "#/components/schemas/Error"}
_IMAGE_BODY = {
    "required": True,
    "content": {
        "image/*": {"schema": {"type": "string", "format": "binary"}},
        "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
        "multipart/form-data": {
            "schema": {
                "type": "object",
                "properties": {"image": {"type": "string", "format": "binary"}},
            }
        },
    },
}


def _answer(description: str, schema: dict | None = None, kind="application/json") -> dict:
    answer = {"description": description}
    if schema is not None:
        answer["content"] = {kind: {"schema": schema}}
    return answer


def _errors(*codes: int) -> dict:
    text = {
        400: "bad request (not an image, bad parameter, malformed body)",
        401: "missing or wrong bearer token (--token)",
        404: "not found",
        405: "method not allowed, or updates on a --read_only service",
        411: "no Content-Length",
        413: "body or image over the limits",
        415: "unsupported Content-Type",
        503: "busy, deadline passed, or the index file is locked by another writer",
    }
    return {str(c): _answer(text[c], _ERROR) for c in codes}


def _op(summary: str, answers: dict, **extra) -> dict:
    return {"summary": summary, "responses": answers, **extra}


_K = {"name": "k", "in": "query", "required": False, "schema": {"type": "integer", "minimum": 1}}
_LABEL_QUERY = {"name": "label", "in": "query", "required": True, "schema": {"type": "string"}}
_LABEL_PATH = {"name": "label", "in": "path", "required": True, "schema": {"type": "string"}}
_PATH = {"name": "path", "in": "query", "required": True, "schema": {"type": "string"}}
_UPLOAD_ERRORS = _errors(400, 401, 411, 413, 415, 503)


def document(version: str = "0.1.0") -> dict:
    obj = {"type": "object"}
    return {
        "openapi": "3.1.0",
        "info": {"title": "ctl_jax search service", "version": version},
        "components": {
            "schemas": {
                "Error": {
                    "type": "object",
                    "properties": {"error": {"type": "string"}},
                    "required": ["error"],
                }
            },
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": {
            "/": {"get": _op("The search page (HTML)", {"200": _answer("the page")}, security=[])},
            "/health": {
                "get": _op("Model and index summary", {"200": _answer("ok", obj)}, security=[])
            },
            "/search": {
                "post": _op(
                    "Search the index with one image: the search-results JSON (docs/formats.md)",
                    {"200": _answer("results", obj), **_UPLOAD_ERRORS},
                    parameters=[_K],
                    requestBody=_IMAGE_BODY,
                )
            },
            "/embed": {
                "post": _op(
                    "Embed one image: {embedding, dim, input_size}",
                    {"200": _answer("the embedding", obj), **_UPLOAD_ERRORS},
                    requestBody=_IMAGE_BODY,
                )
            },
            "/identities": {
                "post": _op(
                    "Add one or more images (raw body, or multipart file parts) to identity "
                    "`label`, new or held; the index file is updated",
                    {
                        "200": _answer("{label, added, items}", obj),
                        **_UPLOAD_ERRORS,
                        **_errors(405),
                    },
                    parameters=[_LABEL_QUERY],
                    requestBody=_IMAGE_BODY,
                )
            },
            "/identities/{label}": {
                "delete": _op(
                    "Remove an identity; the index file is updated",
                    {"200": _answer("{label, removed, items}", obj), **_errors(401, 404, 405, 503)},
                    parameters=[_LABEL_PATH],
                )
            },
            "/image": {
                "get": _op(
                    "A gallery picture named by a search answer",
                    {
                        "200": _answer(
                            "the picture", {"type": "string", "format": "binary"}, "image/*"
                        ),
                        **_errors(401, 404),
                    },
                    parameters=[_PATH],
                )
            },
            "/metrics": {
                "get": _op("Prometheus metrics (text format)", {"200": _answer("metrics")})
            },
            "/openapi.json": {"get": _op("This document", {"200": _answer("OpenAPI", obj)})},
            "/docs": {"get": _op("This document as a page", {"200": _answer("HTML")})},
        },
    }


def docs_page(spec: dict) -> str:
    """A plain HTML table of the routes of `spec`."""
    rows = []
    for path, operations in spec["paths"].items():
        for method, op in operations.items():
            params = ", ".join(p["name"] for p in op.get("parameters", []))
            codes = ", ".join(op["responses"])
            rows.append(
                f"<tr><td>{method.upper()}</td><td><code>{html.escape(path)}</code></td>"
                f"<td>{html.escape(op['summary'])}</td><td>{html.escape(params)}</td>"
                f"<td>{codes}</td></tr>"
            )
    return (
        "<!doctype html><html lang='en'><head><meta charset='utf-8'>"
        "<title>ctl_jax search service API</title><style>body{font-family:system-ui,"
        "sans-serif;margin:1.5em}td,th{border-bottom:1px solid #ddd;padding:4px 8px;"
        "text-align:left;vertical-align:top}</style></head><body>"
        f"<h1>{html.escape(spec['info']['title'])}</h1>"
        "<p>Machine-readable: <a href='/openapi.json'>/openapi.json</a>. Every route but "
        "<code>/</code> and <code>/health</code> needs <code>Authorization: Bearer TOKEN</code> "
        'when the service has a token. Errors are JSON <code>{"error": "..."}</code>.</p>'
        "<table><tr><th>method</th><th>path</th><th>what</th><th>parameters</th>"
        f"<th>statuses</th></tr>{''.join(rows)}</table></body></html>"
    )
