"""Long work started from the page (indexing, evaluation) as server-sent events: one `progress`
event per step of the gateway's stream, `done` at the end, `failure` with the error's JSON."""

import dataclasses
import json
from collections.abc import Iterable, Iterator

from fastapi.responses import StreamingResponse

from convsearch.client import Client
from convsearch.embedding import Configuration
from convsearch.errors import ConvsearchError
from convsearch_web import views
from convsearch_web.errors import error_body, http_status


def event(name: str, data) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


def _events(steps: Iterable[dict]) -> Iterator[str]:
    try:
        last = {}
        for last in steps:
            yield event("progress", last)
        yield event("done", last)
    except ConvsearchError as exc:
        yield event("failure", {"status": http_status(exc), **error_body(exc)})


def _stream(steps: Iterable[dict]) -> StreamingResponse:
    # No buffering by a proxy in between: each step reaches the page when it happens.
    return StreamingResponse(_events(steps), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def index_events(client: Client, dataset: str, config: Configuration) -> StreamingResponse:
    return _stream(dataclasses.asdict(p) for p in client.index(dataset, [config]))


def evaluation_events(client: Client, dataset: str, models: list[str], metrics: list[str], k: int) -> StreamingResponse:
    def steps():
        for p in client.evaluate(dataset, models=models, metrics=metrics, k=k):
            yield {"phase": p.phase, "done": p.done, "total": p.total, "finished": p.finished,
                   "results": [views.score(s) for s in p.results]}

    return _stream(steps())
