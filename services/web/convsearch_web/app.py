"""The web application: the JSON API under /api, the page's static files, and the chart library
served from the installed plotly package (nothing is fetched from elsewhere at run time)."""

import contextlib
import importlib.util
import pathlib

import grpc
from fastapi import FastAPI
from fastapi.responses import FileResponse, JSONResponse
from fastapi.staticfiles import StaticFiles
from grpc_health.v1 import health_pb2, health_pb2_grpc

from convsearch.channels import create_channel
from convsearch.client import Client
from convsearch.local import GATEWAY
from convsearch.tls import client_credentials
from convsearch_web import errors
from convsearch_web.api import router
from convsearch_web.config import WebConfig
from convsearch_web.security import Guard

STATIC = pathlib.Path(__file__).resolve().parent / "static"
UPLOAD_SLACK = 64 * 1024  # the multipart envelope and form fields around an uploaded image


def plotly_js() -> pathlib.Path:
    """plotly.min.js as the plotly package ships it (without importing plotly)."""
    spec = importlib.util.find_spec("plotly")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the plotly package is not installed; pip install plotly (it ships plotly.min.js)")
    path = pathlib.Path(next(iter(spec.submodule_search_locations))) / "package_data" / "plotly.min.js"
    if not path.is_file():
        raise RuntimeError(f"{path} is missing; reinstall plotly")
    return path


class BodyLimit:
    """413 for a request body beyond the upload limit (and the slack around an image): on its
    declared length, before any of it is read; for a body of undeclared length (chunked), as
    soon as what was read passes the limit, so the rest is never read nor spooled to disk."""

    def __init__(self, app, config: WebConfig):
        self.app = app
        self.limit_mb = config.max_upload_mb
        self.limit = config.max_upload_bytes + UPLOAD_SLACK

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.limit:
            return await errors.too_large(self.limit_mb)(scope, receive, send)
        read = 0

        async def counted():
            nonlocal read
            message = await receive()
            read += len(message.get("body", b""))
            if read > self.limit:
                raise errors.BodyTooLarge(self.limit_mb)
            return message

        return await self.app(scope, counted, send)


class PageFiles(StaticFiles):
    """The page's scripts and styles, at the same URLs in every release: `no-cache` like the page,
    so that a browser asks whether they changed rather than run a heuristically fresh old copy."""

    def file_response(self, *args, **kwargs):
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


def _option(value: str) -> str | None:
    """A config value for the client: empty leaves it to the client's environment variable."""
    return value or None


def create_app(config: WebConfig) -> FastAPI:
    """The application, talking to the gateway at config.gateway."""
    credentials = client_credentials(_option(config.tls_ca), _option(config.tls_cert), _option(config.tls_key))

    def new_client(session_version: int = 0) -> Client:
        return Client(config.gateway, config.timeout_s, tls_ca=_option(config.tls_ca),
                      tls_cert=_option(config.tls_cert), tls_key=_option(config.tls_key),
                      api_key=_option(config.api_key), session_version=session_version)

    def job_client() -> Client:
        """A client of a job's own (closing it cancels the job), continuing the shared client's
        session so that it reads what the page wrote."""
        return new_client(gateway.session_version)

    gateway = new_client()
    health_channel = create_channel(config.gateway, credentials=credentials)
    health_stub = health_pb2_grpc.HealthStub(health_channel)
    chart_library = plotly_js()

    def gateway_serving() -> bool:
        try:
            reply = health_stub.Check(health_pb2.HealthCheckRequest(service=GATEWAY), timeout=2.0)
        except grpc.RpcError:
            return False
        return reply.status == health_pb2.HealthCheckResponse.SERVING

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        gateway.close()
        health_channel.close()

    app = FastAPI(title="ConvNet Search", description="The playground's JSON API over the gateway",
                  lifespan=lifespan, docs_url=None, redoc_url=None,  # their pages load scripts from a CDN
                  openapi_url="/api/openapi.json")
    app.state.config = config
    app.state.client = gateway
    app.state.job_client = job_client
    app.state.gateway_serving = gateway_serving
    errors.install(app)

    app.add_middleware(BodyLimit, config=config)
    app.add_middleware(Guard, hosts=config.allowed_hosts)  # outside BodyLimit: refused before any body is read
    app.include_router(router)

    @app.get("/", include_in_schema=False)
    def page() -> FileResponse:
        return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/vendor/plotly.min.js", include_in_schema=False)
    def chart_js() -> FileResponse:
        return FileResponse(chart_library, media_type="text/javascript",
                            headers={"Cache-Control": "public, max-age=86400"})

    @app.get("/healthz", include_in_schema=False)
    def liveness() -> dict:
        """Up while the process is (for liveness probes): the gateway's state does not matter."""
        return {"status": "ok"}

    @app.get("/readyz", include_in_schema=False)
    def readiness() -> JSONResponse:
        """Ready when the gateway serves (for readiness probes)."""
        serving = gateway_serving()
        return JSONResponse({"status": "ok" if serving else "gateway not serving", "gateway": config.gateway},
                            status_code=200 if serving else 503)

    app.mount("/static", PageFiles(directory=STATIC), name="static")
    return app
