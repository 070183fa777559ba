"""Who may call the gateway, and how much: API keys with roles and datasets, a request rate per
key, caps on streams, and an idle timeout for client streams. One server interceptor, `Guard`,
applies them all to the GatewayService; health and reflection pass untouched.

- Authentication: `authorization: Bearer <key>`, checked against the keys file (see
  `convsearch.api_keys` for its format), re-read when it changes (a stat per call). No key or
  an unknown one: UNAUTHENTICATED; so is every key while the file cannot be read (it fails
  closed). Without a keys file every caller may do everything.
- Roles: `RULES` maps each RPC to the role it needs and where its dataset is; a key whose role
  or datasets do not allow the call gets PERMISSION_DENIED naming what is missing. A stream's
  every message is checked as it is read, and every response before it is sent, against the
  key's line as the file says then: a key revoked (UNAUTHENTICATED), downgraded or narrowed while
  its stream is open ends the stream. ListDatasets shows a scoped key only its datasets.
- Rate: a token bucket per key (per client address without keys); an empty bucket answers
  RESOURCE_EXHAUSTED with the wait in the message and in trailing metadata `retry-after-ms`.
- Streams: a streaming RPC holds one of the server's worker threads for its whole life, so
  streams get at most `max_streams` of them (fewer than the workers: unary calls and health
  always find one) and at most `max_streams_per_key` each key (0: half of `max_streams`, so one
  key cannot take every slot); one beyond a cap is refused at
  once with RESOURCE_EXHAUSTED. A client stream's messages are read on a helper thread so that
  waiting for one can time out: a stream that sends nothing for `idle_timeout_s` is ended with
  DEADLINE_EXCEEDED, freeing its worker. A stream whose client stops reading is cancelled once
  a response has waited `idle_timeout_s` to be sent (`SendWatch`), freeing its worker too.
"""

import contextlib
import dataclasses
import hashlib
import logging
import os
import queue
import threading
import time
from collections.abc import Callable, Iterator

import grpc

from convsearch.api_keys import ApiKey, bearer_token, parse_keys
from convsearch.errors import (
    ConvsearchError,
    DeadlineExceeded,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    shown,
)
from convsearch.grpc_errors import abort
from convsearch.observability import behavior_of, with_behavior
from convsearch.stream_cap import released_with_rpc

log = logging.getLogger("convsearch.gateway.auth")
RETRY_AFTER_MS = "retry-after-ms"

# Where an RPC's request names its dataset.
NO_DATASET = "none"  # the RPC touches no dataset
DATASET = "dataset"  # the field `dataset` (or `name`) names it; a scoped key must name one of its own
OPTIONAL_DATASET = "optional"  # as DATASET, but the RPC may name none (then it touches none)
LISTED = "listed"  # the RPC lists datasets: a scoped key sees only its own
UNSCOPED = "unscoped"  # the RPC may reach any dataset (a snapshot by its name): keys scoped to datasets may not


@dataclasses.dataclass(frozen=True)
class Rule:
    """What calling one RPC takes: the least role, and where its dataset is."""

    role: str
    dataset: str = DATASET


# Every RPC of convsearch.gateway.v1.GatewayService (a test keeps this complete). An RPC missing
# here needs `admin` (and is logged), so a new RPC is closed until it is given a rule.
RULES: dict[str, Rule] = {
    "ListModels": Rule("read", NO_DATASET),
    "ListDatasets": Rule("read", LISTED),
    "GetDataset": Rule("read"),
    "Search": Rule("read"),
    "GetImage": Rule("read"),
    "Evaluate": Rule("write"),  # it creates and fills collections, and stores its results
    "Compare": Rule("read"),  # reads the results Evaluate stored
    "Project": Rule("read"),  # its cache is bounded: see convsearch_gateway.projection
    "InspectLayer": Rule("read", OPTIONAL_DATASET),
    "Ingest": Rule("write"),
    "IndexDataset": Rule("write"),
    "DeleteItems": Rule("write"),
    "CreateDataset": Rule("admin"),
    "DeleteDataset": Rule("admin"),
    "DeleteCollection": Rule("admin"),
    "SnapshotDataset": Rule("admin"),
    "ListSnapshots": Rule("admin"),  # a scoped key must name one of its datasets
    "RestoreDataset": Rule("admin", UNSCOPED),  # the snapshot may be of any dataset
    "DeleteSnapshot": Rule("admin", UNSCOPED),
}
UNLISTED_RULE = Rule("admin", UNSCOPED)


def dataset_of(message) -> str:
    """The dataset a request names: its `dataset` field, else its `name` field, else ""."""
    fields = message.DESCRIPTOR.fields_by_name
    for field in ("dataset", "name"):
        if field in fields:
            return getattr(message, field)
    return ""


class KeysFile:
    """The keys of a keys file, re-read when the file changes (its mtime, size or inode). It fails
    closed: while the file cannot be read (missing, renamed away) every key is refused; a file
    with a bad line keeps only the keys read before that it still lists (so a line removed or
    commented out revokes its key at once), each as its new line says when that line is good.
    Keys new to the file wait until it parses."""

    def __init__(self, path: str):
        self.path = path
        self._lock = threading.Lock()
        self._signature = self._stat()
        if self._signature is None:
            raise ValueError(f"cannot read the API keys file {path}")
        with open(path, encoding="utf-8") as file:
            self._keys: dict[str, ApiKey] | None = parse_keys(file.read(), path)  # None: the file is unreadable

    def _stat(self):
        try:
            stat = os.stat(self.path)
        except OSError:
            return None
        return stat.st_mtime_ns, stat.st_size, stat.st_ino

    def __len__(self) -> int:
        return len(self._keys or ())

    def lookup(self, token: str) -> ApiKey | None:
        """The key `token` is, if the file lists it; Unauthenticated while the file cannot be read."""
        return self.listed(hashlib.sha256(token.encode()).hexdigest())

    def listed(self, digest: str) -> ApiKey | None:
        """The key of this SHA-256 (hex) as the file lists it now, if it does; Unauthenticated
        while the file cannot be read."""
        signature = self._stat()
        if signature != self._signature:
            self._reload(signature)
        keys = self._keys
        if keys is None:
            raise Unauthenticated("the gateway's API keys file is missing (or unreadable), so every key is refused "
                                  "until it is back; tell the gateway's operator", reason="API_KEYS_FILE_MISSING")
        return keys.get(digest)

    def _reload(self, signature) -> None:
        with self._lock:
            if signature == self._signature:
                return
            self._signature = signature
            try:
                with open(self.path, "rb") as file:
                    data = file.read()
            except OSError as exc:
                self._keys = None
                log.error("API keys file %s cannot be read, every key is refused until it is back: %s", self.path,
                          exc.strerror or exc)
                return
            try:
                self._keys = parse_keys(data.decode("utf-8"), self.path)
            except ValueError as exc:  # UnicodeDecodeError included
                self._keys = self._still_listed(data.decode("utf-8", "replace"))
                log.error("API keys file %s has an error, only the %d keys read before that it still lists stay "
                          "until it parses: %s", self.path, len(self._keys), exc)
                return
            log.info("API keys file %s reloaded: %d keys", self.path, len(self._keys))

    def _still_listed(self, text: str) -> dict[str, ApiKey]:
        """The keys read before whose digest starts a line of `text`: as that line says when it
        parses, else as before."""
        before = self._keys or {}
        kept: dict[str, ApiKey] = {}
        for line in text.splitlines():
            fields = line.partition("#")[0].split()
            digest = fields[0].removeprefix("sha256:") if fields else ""
            if digest in before:
                try:
                    kept[digest] = parse_keys(line, self.path)[digest]
                except ValueError:
                    kept[digest] = before[digest]
        return kept


class TokenBuckets:
    """A token bucket per caller: `rate` tokens a second, up to `burst` saved. A caller whose
    bucket has refilled is forgotten (it would start full anyway) when a new caller comes and
    more than `_PRUNE_AT` are remembered; the next such sweep waits until their number has
    doubled, so sweeps cost O(1) a call amortised and memory follows the callers of the last
    `burst / rate` seconds."""

    _PRUNE_AT = 10_000

    def __init__(self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic):
        self.rate = rate
        self.burst = max(1, burst)
        self._clock = clock
        self._lock = threading.Lock()
        self._buckets: dict[str, tuple[float, float]] = {}
        self._prune_at = self._PRUNE_AT

    def __len__(self) -> int:
        """Callers remembered."""
        return len(self._buckets)

    def take(self, caller: str) -> float:
        """Takes a token: 0.0 when there was one, else the seconds until there is."""
        now = self._clock()
        with self._lock:
            if caller not in self._buckets and len(self._buckets) >= self._prune_at:
                self._forget_full(now)
            tokens, then = self._buckets.get(caller, (self.burst, now))
            tokens = min(self.burst, tokens + (now - then) * self.rate)
            if tokens >= 1:
                self._buckets[caller] = (tokens - 1, now)
                return 0.0
            self._buckets[caller] = (tokens, now)
            return (1 - tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        self._buckets = {caller: (tokens, then) for caller, (tokens, then) in self._buckets.items()
                         if tokens + (now - then) * self.rate < self.burst}
        self._prune_at = max(self._PRUNE_AT, 2 * len(self._buckets))


class StreamSlots:
    """Counts open streams, in all (at most `total`) and per caller (at most `per_caller`)."""

    def __init__(self, total: int, per_caller: int):
        self.total = total
        self.per_caller = per_caller
        self._lock = threading.Lock()
        self._open = 0
        self._by_caller: dict[str, int] = {}

    def acquire(self, caller: str, caller_name: str) -> str | None:
        """Takes a slot; None when taken, else why not."""
        with self._lock:
            if self._open >= self.total:
                return (f"the gateway serves {self.total} streams at once and all are busy; "
                        "retry shortly (unary calls are not affected)")
            mine = self._by_caller.get(caller, 0)
            if mine >= self.per_caller:
                return f"{caller_name} has {mine} streams open, the most one caller may; finish one first"
            self._open += 1
            self._by_caller[caller] = mine + 1
            return None

    def release(self, caller: str) -> None:
        with self._lock:
            self._open -= 1
            left = self._by_caller[caller] - 1
            if left:
                self._by_caller[caller] = left
            else:
                del self._by_caller[caller]

    @property
    def open(self) -> int:
        return self._open


_MESSAGE, _END, _ERROR = range(3)


class WatchedRequests:
    """A client stream's request iterator whose every wait for a message ends after `timeout_s`
    with DeadlineExceeded. gRPC's iterator cannot time out, so a helper thread reads it, one
    message at a time when asked (no read-ahead: flow control stays with the reader). `check`
    sees each message (with whether it is the first) and may raise a ConvsearchError to end
    the stream; `failure` keeps the error that ended it here."""

    def __init__(self, requests, timeout_s: float, check: Callable[[object, bool], None]):
        self._requests = requests
        self._timeout_s = timeout_s
        self._check = check
        self._wanted = threading.Semaphore(0)
        self._arrived: queue.SimpleQueue = queue.SimpleQueue()
        self._reader: threading.Thread | None = None
        self._first = True
        self._finished = False
        self._closed = False
        self.failure: ConvsearchError | None = None

    def __iter__(self) -> "WatchedRequests":
        return self

    def __next__(self):
        if self._finished:
            raise StopIteration
        if self._reader is None:
            self._reader = threading.Thread(target=self._read, name="stream-reader", daemon=True)
            self._reader.start()
        self._wanted.release()
        try:
            kind, value = self._arrived.get(timeout=self._timeout_s)
        except queue.Empty:
            self._fail(DeadlineExceeded(f"the stream sent nothing for {self._timeout_s:g} s, the gateway's stream "
                                        "idle timeout (--stream-idle-timeout-s); it was ended", reason="STREAM_IDLE"))
        if kind == _END:
            self._finished = True
            raise StopIteration
        if kind == _ERROR:
            self._finished = True
            raise value
        first, self._first = self._first, False
        try:
            self._check(value, first)
        except ConvsearchError as exc:
            self._fail(exc)
        return value

    def _fail(self, error: ConvsearchError):
        self._finished = True
        self.failure = error
        raise error

    def _read(self) -> None:
        while True:
            self._wanted.acquire()
            if self._closed:
                return
            try:
                message = next(self._requests)
            except StopIteration:
                self._arrived.put((_END, None))
                return
            except BaseException as exc:  # noqa: BLE001 - handed to the handler's thread
                self._arrived.put((_ERROR, exc))
                return
            self._arrived.put((_MESSAGE, message))

    def close(self) -> None:
        """Lets the helper thread end (once its read returns, which the RPC's end makes happen)."""
        self._closed = True
        self._wanted.release()


class SendWatch:
    """Calls `on_stall` (once) when a response handed to gRPC has not been sent within
    `timeout_s`: the client stopped reading, flow control holds the send, and with it the
    handler's worker thread and stream slot, out of the idle timeout's reach. gRPC asks for the
    next response only once the last one is sent, so the time from a `sending` block's start to
    its end is the send's. A helper thread, started with the first response, watches."""

    def __init__(self, timeout_s: float, on_stall: Callable[[], None]):
        self._timeout_s = timeout_s
        self._on_stall = on_stall
        self._changed = threading.Condition()
        self._since: float | None = None  # when the response being sent was handed over
        self._over = False
        self._watcher: threading.Thread | None = None
        self._asleep = False  # the watcher waits for a send: wake it (else it wakes by itself, at a deadline)

    @contextlib.contextmanager
    def sending(self):
        with self._changed:
            self._since = time.monotonic()
            if self._watcher is None:
                self._watcher = threading.Thread(target=self._watch, name="stream-send-watch", daemon=True)
                self._watcher.start()
            elif self._asleep:
                self._asleep = False
                self._changed.notify()
        try:
            yield
        finally:
            with self._changed:
                self._since = None

    def stop(self) -> None:
        with self._changed:
            self._over = True
            self._changed.notify()

    def _watch(self) -> None:
        with self._changed:
            while not self._over:
                if self._since is None:
                    self._asleep = True
                    self._changed.wait()
                    continue
                left = self._since + self._timeout_s - time.monotonic()
                if left <= 0:
                    break
                self._changed.wait(left)
            else:
                return
        self._on_stall()


@dataclasses.dataclass(frozen=True)
class Caller:
    """Who is calling: the key (None without keys) and the name limits count under."""

    identity: str
    key: ApiKey | None

    @property
    def name(self) -> str:
        return self.key.name if self.key else f"client {self.identity}"

    def allows_dataset(self, dataset: str) -> bool:
        return self.key is None or self.key.allows_dataset(dataset)


def _peer_host(peer: str) -> str:
    """`ipv4:10.0.0.1:5678` -> `ipv4:10.0.0.1`, `ipv6:[::1]:5678` -> `ipv6:[::1]`: a client's
    address without its port, so its connections share limits."""
    if peer.startswith(("ipv4:", "ipv6:")):
        return peer.rpartition(":")[0]
    return peer


class Guard(grpc.ServerInterceptor):
    """Authenticates, authorises and limits the calls of the service `service_name` (see the module)."""

    def __init__(self, service_name: str, keys: KeysFile | None = None, rate_per_s: float = 0.0, burst: int = 0,
                 max_streams: int = 32, max_streams_per_key: int = 0, idle_timeout_s: float = 30.0):
        self.service_name = service_name
        self.keys = keys
        self.buckets = TokenBuckets(rate_per_s, burst or max(1, round(rate_per_s))) if rate_per_s > 0 else None
        self.streams = StreamSlots(max_streams, max_streams_per_key or max(1, max_streams // 2))
        self.idle_timeout_s = idle_timeout_s
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    def intercept_service(self, continuation, handler_call_details):
        method = handler_call_details.method
        service, _, rpc = method.lstrip("/").rpartition("/")
        if service != self.service_name:
            return continuation(handler_call_details)  # health, reflection: open, unlimited
        guarded = self._handlers.get(method)
        if guarded is None:
            handler = continuation(handler_call_details)
            if handler is None:
                return None
            rule = RULES.get(rpc)
            if rule is None:
                log.warning("RPC %s has no rule in convsearch_gateway.auth.RULES; it needs the admin role", rpc)
                rule = UNLISTED_RULE
            guarded = self._handlers[method] = self._guarded(handler, rpc, rule)
        return guarded

    # ---- checks, each aborting the RPC when it fails ----

    def _caller(self, context) -> Caller:
        if self.keys is None:
            return Caller(_peer_host(context.peer() or ""), None)
        token = bearer_token(context.invocation_metadata())
        if not token:
            abort(context, Unauthenticated("this gateway needs an API key: send metadata `authorization: Bearer <key>` "
                                           "(convsearch --api-key, Client(api_key=...) or CONVSEARCH_API_KEY)",
                                           reason="API_KEY_MISSING"))
        try:
            key = self.keys.lookup(token)
        except Unauthenticated as exc:
            abort(context, exc)
        if key is None:
            abort(context, Unauthenticated("unknown API key (revoked, mistyped, or for another gateway)",
                                           reason="API_KEY_UNKNOWN"))
        return Caller(f"sha256:{key.digest}", key)

    def _admit(self, rpc: str, rule: Rule, context) -> Caller:
        caller = self._caller(context)
        refusal = self._role_refusal(rpc, rule, caller.key)
        if refusal is not None:
            abort(context, refusal)
        if self.buckets is not None:
            wait_s = self.buckets.take(caller.identity)
            if wait_s:
                wait_ms = max(1, int(wait_s * 1000 + 0.999))
                context.set_trailing_metadata((*(context.trailing_metadata() or ()), (RETRY_AFTER_MS, str(wait_ms))))
                abort(context, ResourceExhausted(
                    f"rate limit: {caller.name} may make {self.buckets.rate:g} requests a second "
                    f"(bursts of {self.buckets.burst}); retry in {wait_ms} ms", reason="RATE_LIMITED",
                    retry_after_s=wait_ms / 1000,
                    metadata={"rate_per_s": f"{self.buckets.rate:g}", "burst": str(self.buckets.burst)}))
        return caller

    @staticmethod
    def _role_refusal(rpc: str, rule: Rule, key: ApiKey | None) -> PermissionDenied | None:
        if key is None or key.allows_role(rule.role):
            return None
        return PermissionDenied(f"{rpc} needs an API key with the {rule.role!r} role; {key.name} has {key.role!r}",
                                reason="ROLE_INSUFFICIENT",
                                metadata={"rpc": rpc, "role": key.role, "needed_role": rule.role})

    @staticmethod
    def _dataset_refusal(caller: Caller, rule: Rule, dataset: str) -> PermissionDenied | None:
        if caller.key is None or caller.key.datasets is None or rule.dataset in (NO_DATASET, LISTED):
            return None
        if not dataset and rule.dataset == OPTIONAL_DATASET:
            return None
        if rule.dataset != UNSCOPED and caller.allows_dataset(dataset):
            return None
        allowed = ", ".join(sorted(caller.key.datasets))
        if rule.dataset == UNSCOPED:
            message = (f"this RPC may reach any dataset, so it needs a key for all datasets; {caller.key.name} may "
                       f"touch only: {allowed}")
        else:
            what = f"dataset {shown(dataset)}" if dataset else "every dataset"
            message = f"{caller.key.name} may not touch {what}; it may touch: {allowed}"
        return PermissionDenied(message, reason="DATASET_NOT_ALLOWED", metadata={"dataset": dataset})

    def _still_admitted(self, rpc: str, rule: Rule, caller: Caller, dataset: str | None) -> None:
        """Raises unless the caller's key, as the keys file lists it now, still allows this
        stream's RPC and its dataset (None: none named yet): a key revoked (UNAUTHENTICATED),
        downgraded or narrowed (PERMISSION_DENIED) while a stream is open ends that stream."""
        if caller.key is None:
            return
        key = self.keys.listed(caller.key.digest)
        if key is None:
            raise Unauthenticated(f"{caller.key.name} was revoked while this {rpc} stream was open, so the stream "
                                  "was ended; use a key the gateway's keys file lists", reason="API_KEY_REVOKED")
        refusal = self._role_refusal(rpc, rule, key)
        if refusal is None and dataset is not None:
            refusal = self._dataset_refusal(Caller(caller.identity, key), rule, dataset)
        if refusal is not None:
            raise refusal

    # ---- the wrapped handlers ----

    def _guarded(self, handler: grpc.RpcMethodHandler, rpc: str, rule: Rule) -> grpc.RpcMethodHandler:
        behavior = behavior_of(handler)
        streaming = handler.request_streaming or handler.response_streaming

        def guarded(request, context):
            caller = self._admit(rpc, rule, context)
            if not handler.request_streaming:
                refusal = self._dataset_refusal(caller, rule, dataset_of(request))
                if refusal is not None:
                    abort(context, refusal)
            if not streaming:
                response = behavior(request, context)
                if rule.dataset == LISTED and caller.key is not None and caller.key.datasets is not None:
                    kept = [d for d in response.datasets if caller.allows_dataset(d.name)]
                    del response.datasets[:]
                    response.datasets.extend(kept)
                return response
            return self._stream(behavior, handler, rpc, rule, caller, request, context)

        return with_behavior(handler, guarded)

    def _stream(self, behavior, handler, rpc: str, rule: Rule, caller: Caller, request, context):
        refusal = self.streams.acquire(caller.identity, caller.name)
        if refusal:
            abort(context, ResourceExhausted(refusal, reason="TOO_MANY_STREAMS"))
        stream_dataset = None if handler.request_streaming else dataset_of(request)
        requests = None
        if handler.request_streaming:
            def check(message, first: bool) -> None:
                nonlocal stream_dataset
                if first:
                    stream_dataset = dataset_of(message)
                # later messages may leave the dataset empty: the first one's
                self._still_admitted(rpc, rule, caller, dataset_of(message) or stream_dataset)

            request = requests = WatchedRequests(request, self.idle_timeout_s, check)

        def admitted() -> None:
            self._still_admitted(rpc, rule, caller, stream_dataset)

        def free() -> None:
            self.streams.release(caller.identity)
            if requests is not None:
                requests.close()

        release = released_with_rpc(context, free)  # at the handler's end or the RPC's, whichever comes first
        try:
            result = behavior(request, context)
        except BaseException:
            release()
            self._enforce(requests, context)
            raise
        if not handler.response_streaming:
            release()
            return result
        watch = SendWatch(self.idle_timeout_s, lambda: self._cancel_stalled(rpc, caller, context))
        return self._responses(iter(result), requests, admitted, watch, release, context)

    @staticmethod
    def _enforce(requests: WatchedRequests | None, context) -> None:
        """Ends the RPC with the error that ended its client stream here, whatever the handler made of it."""
        if requests is not None and requests.failure is not None:
            abort(context, requests.failure)

    def _cancel_stalled(self, rpc: str, caller: Caller, context) -> None:
        """Ends a stream whose client stopped reading. Its status could not reach the client (it
        would queue behind the unread responses), so the RPC is cancelled: the client sees
        CANCELLED, the log says why."""
        log.warning("%s of %s cancelled: a response waited %g s for the client to read it "
                    "(--stream-idle-timeout-s), holding a stream slot", rpc, caller.name, self.idle_timeout_s)
        context.cancel()

    def _responses(self, responses: Iterator, requests: WatchedRequests | None, admitted: Callable[[], None],
                   watch: SendWatch, release, context) -> Iterator:
        """The handler's responses, each sent only while the caller is still `admitted`."""
        try:
            for response in responses:
                try:
                    admitted()
                except ConvsearchError as exc:
                    abort(context, exc)
                with watch.sending():
                    yield response
        except GeneratorExit:
            raise
        except BaseException:
            self._enforce(requests, context)
            raise
        finally:
            watch.stop()
            getattr(responses, "close", lambda: None)()  # the handler's own clean-up, now
            release()
