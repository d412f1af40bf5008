"""The baseline of serve_load.py: a Falcon endpoint returning a fixed 20-item JSON list, with the
same JSON handler and gunicorn settings as the real server
(`gunicorn benchmarks.trivial_app:app`)."""

from __future__ import annotations

import falcon
import orjson

ITEMS = {
    "items": [
        {"item_id": f"i{n:07d}", "rank": n + 1, "score": round(1.0 - n / 100, 6)} for n in range(20)
    ]
}


class FixedList:
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.bounded_stream.read()
        resp.media = ITEMS


def create_app() -> falcon.App:
    app = falcon.App()
    handler = falcon.media.JSONHandler(dumps=orjson.dumps, loads=orjson.loads)
    app.req_options.media_handlers[falcon.MEDIA_JSON] = handler
    app.resp_options.media_handlers[falcon.MEDIA_JSON] = handler
    app.add_route("/v1/recommend", FixedList())
    return app


app = create_app()
