"""GET /openapi.json and GET /docs (a self-contained HTML page; no CDN assets)."""

from __future__ import annotations

import html

import falcon
import orjson


class OpenApiResource:
    """The OpenAPI document generated from the route table (`serving.openapi`)."""

    def __init__(self, spec: dict) -> None:
        self._data = orjson.dumps(spec)

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.data = self._data
        resp.content_type = falcon.MEDIA_JSON


class DocsResource:
    """A readable rendering of the OpenAPI document: routes, summaries, schemas."""

    def __init__(self, spec: dict) -> None:
        self._spec = spec
        self._page: str | None = None

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        if self._page is None:
            self._page = render_docs(self._spec)
        resp.text = self._page
        resp.content_type = falcon.MEDIA_HTML


def render_docs(spec: dict) -> str:
    esc = html.escape
    rows = []
    for path, ops in spec["paths"].items():
        for method, op in ops.items():
            if method == "parameters":
                continue
            codes = ", ".join(sorted(op.get("responses", {})))
            auth = "public" if op.get("security") == [] else "Bearer JWT or X-Api-Key"
            rows.append(
                f"<tr><td><code>{method.upper()}</code></td><td><code>{esc(path)}</code></td>"
                f"<td>{esc(op.get('summary', ''))}</td><td>{auth}</td><td>{codes}</td></tr>"
            )
    schemas = "".join(
        f"<h3 id='{esc(name)}'>{esc(name)}</h3><pre>{esc(_pretty(schema))}</pre>"
        for name, schema in spec["components"]["schemas"].items()
    )
    title = esc(spec["info"]["title"])
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>{title} API</title>
<style>body{{font-family:system-ui,sans-serif;max-width:70em;margin:2em auto;padding:0 1em}}
table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:.3em .6em;text-align:left}}
pre{{background:#f6f6f6;padding:.6em;overflow:auto}}</style></head><body>
<h1>{esc(spec["info"]["title"])} API</h1><p>{esc(spec["info"]["description"])}</p>
<p>Machine-readable: <a href="/openapi.json">/openapi.json</a> (OpenAPI {spec["openapi"]}).</p>
<table><tr><th>method</th><th>path</th><th>what</th><th>auth</th><th>statuses</th></tr>{"".join(rows)}</table>
<h2>Schemas</h2>{schemas}</body></html>"""


def _pretty(schema: dict) -> str:
    return orjson.dumps(schema, option=orjson.OPT_INDENT_2).decode()
