"""Long work started from the page (indexing, evaluation) as server-sent events: one `progress`
event per step of the gateway's stream, `done` at the end, `failure` with the error's JSON.

Each job streams through a client of its own: when the page goes away (reload, navigation, a
closed tab), closing that client's channel cancels the gateway's stream, and so the job."""

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


class JobResponse(StreamingResponse):
    """The events of a job run by `client`, which is closed (cancelling the job's stream) as soon
    as the page disconnects, and in any case once the response ends."""

    def __init__(self, client: Client, steps: Iterable[dict]):
        # No buffering by a proxy in between: each step reaches the page when it happens.
        super().__init__(_events(steps), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.client = client

    async def listen_for_disconnect(self, receive) -> None:
        await super().listen_for_disconnect(receive)
        self.client.close()  # the thread waiting for the gateway's next step gets CANCELLED at once

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.client.close()


def index_events(client: Client, dataset: str, config: Configuration) -> JobResponse:
    return JobResponse(client, (dataclasses.asdict(p) for p in client.index(dataset, [config])))


def evaluation_events(client: Client, dataset: str, configurations: list[Configuration], k: int) -> JobResponse:
    def steps():
        for p in client.evaluate(dataset, configurations=configurations, k=k):
            yield {"phase": p.phase, "done": p.done, "total": p.total, "finished": p.finished,
                   "results": [views.score(s) for s in p.results]}

    return JobResponse(client, steps())

