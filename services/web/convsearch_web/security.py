"""What keeps other sites' pages from using the API through a visitor's browser: the API acts
with the service's own key, so only the page the service serves (and clients outside a browser)
may call it.

- Host allow-list: a page under a name of the attacker's that resolves to this service (DNS
  rebinding) is same-origin with it; the Host header still names the attacker's name.
- Fetch Metadata: a browser says in Sec-Fetch-Site that another site's page made a request (only
  to a secure or localhost origin).
- A custom header on every request that changes something (and on the two event streams, GETs
  that start indexing and evaluation): a page of another origin can send it only after a CORS
  preflight, which this service never grants; an <img>, a form or a plain link cannot send it.
- Response headers that forbid framing the page (clickjacking) and sniffing content types.
"""

import re

from starlette.datastructures import Headers

from convsearch.channels import LOOPBACK
from convsearch_web import errors

HEALTH = ("/healthz", "/readyz")  # probed by the pod's IP: no Host to allow
OTHER_SITES = ("cross-site", "same-site")  # Sec-Fetch-Site values of a request made by another site's page
INTENT_HEADER = "x-requested-with"
INTENT_VALUE = "convsearch"
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")
JOB_STREAMS = re.compile(r"/api/datasets/[^/]+/(index|evaluate)/events")  # GETs that start work
HOST_NAME = re.compile(r"\*|[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\]")
RESPONSE_HEADERS = [(b"x-frame-options", b"DENY"), (b"content-security-policy", b"frame-ancestors 'none'"),
                    (b"x-content-type-options", b"nosniff")]


def check_allowed_hosts(value: str) -> None:
    """Raises ValueError unless `value` is comma-separated host names (no port), IPs or `*`."""
    for name in filter(None, (part.strip() for part in value.split(","))):
        if not HOST_NAME.fullmatch(name):
            raise ValueError(f"allowed_hosts: {name!r} is not a host name, an IP ([...] for IPv6) or *; "
                             "give names without scheme or port, e.g. convsearch.example.org,10.0.0.5")


def allowed_hosts(value: str) -> frozenset[str]:
    """The host names the service answers to: the flag's (lower case, IPv6 without brackets) and loopback."""
    named = (part.strip().lower().strip("[]") for part in value.split(","))
    return frozenset(filter(None, named)) | frozenset(LOOPBACK)  # always allowed: only this machine reaches them


def host_name(host: str) -> str:
    """The name in a Host header, without its port: `example.org:8080` -> example.org, `[::1]:80` -> ::1."""
    if host.startswith("["):
        return host[1:].partition("]")[0]
    return host.rpartition(":")[0] if ":" in host else host


def host_refusal(headers: Headers, allowed: frozenset[str]):
    """403 for a Host this service was not told it is reached as (None when allowed)."""
    if "*" in allowed or host_name(headers.get("host", "")).lower() in allowed:
        return None
    return errors.refusal(403, "PERMISSION_DENIED", "HOST_NOT_ALLOWED",
                          f"this service is not reached as {headers.get('host', '(no Host header)')!r}; add the "
                          "host name to --allowed-hosts (CONVSEARCH_WEB_ALLOWED_HOSTS, comma-separated, * for any)")


def starts_work(method: str, path: str) -> bool:
    """Whether a request changes something: any method but a safe one, and the job streams."""
    return method not in SAFE_METHODS or JOB_STREAMS.fullmatch(path) is not None


def api_refusal(method: str, path: str, headers: Headers):
    """403 for an API request another site's page made, or one that changes something without
    the header only the service's own page (or a client outside a browser) sends; None to pass."""
    if headers.get("sec-fetch-site") in OTHER_SITES:
        return errors.refusal(403, "PERMISSION_DENIED", "CROSS_SITE", "the API answers only the page it serves "
                              "and clients outside a browser, not a page of another site")
    if starts_work(method, path) and headers.get(INTENT_HEADER) != INTENT_VALUE:
        return errors.refusal(403, "PERMISSION_DENIED", "CSRF",
                              f"a request that changes something needs the header 'X-Requested-With: {INTENT_VALUE}'"
                              " (the page sends it; a page of another site cannot)")
    return None


class Guard:
    """Refuses what `host_refusal` and `api_refusal` refuse, before the request's body is read,
    and adds RESPONSE_HEADERS to every answer, refusals included."""

    def __init__(self, app, hosts: str):
        self.app = app
        self.allowed = allowed_hosts(hosts)

    def refusal(self, scope):
        headers, path = Headers(scope=scope), scope["path"]
        if path in HEALTH:
            return None
        return host_refusal(headers, self.allowed) or (
            api_refusal(scope["method"], path, headers) if path.startswith("/api/") else None)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def with_headers(message):
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []), *RESPONSE_HEADERS]
            await send(message)

        refused = self.refusal(scope)
        return await (refused or self.app)(scope, receive, with_headers)
