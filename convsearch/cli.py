"""The `convsearch` command: run the services locally, manage datasets, ingest, index, search,
and the demo. Tables for people, --json for scripts; errors as one line.

Exit codes: 0 done, 1 the request failed (for `rebalance`: a dataset was skipped), 2 bad usage,
3 a service is unavailable, 130 interrupted.
Bad usage (2) includes a file named on the command line that cannot be read, a malformed address
or port and, for `up`, a port it needs that another process holds. Under --json a failure also
prints {"error": {"code", "reason", "message", "metadata"}} on stdout. --gateway defaults to
CONVSEARCH_GATEWAY; --json, --gateway, --api-key and --tls-* go before or after the subcommand.
"""

import argparse
import csv
import dataclasses
import datetime
import errno
import json
import os
import pathlib
import signal
import socket
import sys
import tempfile
import threading
from collections.abc import Iterator

from convsearch.api_keys import ENV_API_KEY, ROLES, key_line, new_key
from convsearch.channels import create_channel
from convsearch.client import Client
from convsearch.config import check_address, check_port
from convsearch.embedding import Configuration
from convsearch.enums import METRIC_ENUMS, POOLING_ENUMS
from convsearch.errors import AlreadyExists, ConvsearchError, NotFound, Unavailable
from convsearch.health import wait_until_serving
from convsearch.local import GATEWAY, LocalStack
from convsearch.placement import parse_primaries
from convsearch.rebalance import Primaries, rebalance
from convsearch.tls import ENV_CA, ENV_CERT, ENV_KEY, TLSError, client_credentials
from convsearch.weights import NONE as NO_WEIGHTS

FASHION200 = pathlib.Path(__file__).resolve().parent.parent / "datasets" / "fashion200"
IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff"}
DEMO_MODEL = "efficientnet_lite0"
ENV_GATEWAY = "CONVSEARCH_GATEWAY"
DEFAULT_GATEWAY = "127.0.0.1:50051"


class UsageError(Exception):
    """A bad command line (exit code 2)."""


def progress(label: str, done: int, total: int, rate: float = 0.0, final: bool = False) -> None:
    """A progress bar on stderr (only on a terminal, and the final line always)."""
    if not (sys.stderr.isatty() or final):
        return
    sys.stdout.flush()
    width = 30
    filled = width * done // total if total else width
    speed = f" {rate:.1f} img/s" if rate else ""
    end = "\n" if final else ""
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}{speed}{end}")
    sys.stderr.flush()


def table(rows: list[dict], columns: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(row[c])) for row in rows)) if rows else len(c) for c in columns}
    lines = ["  ".join(c.ljust(widths[c]) for c in columns)]
    lines += ["  ".join(str(row[c]).ljust(widths[c]) for c in columns) for row in rows]
    return "\n".join(lines)


def _jsonable(value):
    if dataclasses.is_dataclass(value):
        return dataclasses.asdict(value)
    return value.isoformat() if isinstance(value, datetime.datetime) else str(value)


def emit(args, data, rows: list[dict] | None = None, columns: list[str] | None = None) -> None:
    if args.json:
        print(json.dumps(data, default=_jsonable))
    elif rows is not None:
        print(table(rows, columns))


def read_file(path: str, option: str) -> bytes:
    """The bytes of a file the user named; UsageError (exit 2) naming it when it cannot be read."""
    try:
        return pathlib.Path(path).read_bytes()
    except FileNotFoundError:
        raise UsageError(f"{option} {path}: no such file") from None
    except IsADirectoryError:
        raise UsageError(f"{option} {path}: is a folder, not a file") from None
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot read it ({exc.strerror or exc})") from None


def checked_address(address: str, what: str) -> str:
    """`address` when it is host:port; UsageError (exit 2) naming it otherwise."""
    try:
        check_address(address, what)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return address


def output_folder(path: str, option: str) -> pathlib.Path:
    """The folder the user named for output, made if missing; UsageError (exit 2) when it cannot be."""
    folder = pathlib.Path(path)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise UsageError(f"{option} {path}: is a file, not a folder; name a folder") from None
    except OSError as exc:
        raise UsageError(f"{option} {path}: cannot make the folder ({exc.strerror or exc})") from None
    return folder


Source = tuple[str, str, pathlib.Path]
"""An image to ingest: (id, label, file)."""


def image_files(path: pathlib.Path) -> list[Source]:
    """The images of an ImageFolder-style folder (sub-folders are labels) or of a CSV manifest of
    path,label. Ids are paths without extension, relative to the folder or the manifest's folder.
    UsageError (exit 2) for a missing or empty source, or two images that would get one id."""
    if not path.exists():
        raise UsageError(f"{path}: no such folder or file")
    if path.is_dir():
        sources = folder_images(path)
    elif path.suffix.lower() == ".csv":
        sources = manifest_images(path)
    else:
        raise UsageError(f"{path} is neither a folder of images nor a .csv manifest")
    check_unique_ids(sources)
    return sources


def folder_images(folder: pathlib.Path) -> list[Source]:
    """The regular files (or links to them) with an image suffix under `folder`, skipping hidden
    entries (a name starting with `.`, e.g. .git/ or macOS ._x.png) and whatever else is not a file
    (a folder named x.png, a broken link)."""
    files = sorted(file for file in folder.rglob("*") if file.suffix.lower() in IMAGE_SUFFIXES
                   and not any(part.startswith(".") for part in file.relative_to(folder).parts) and file.is_file())
    if not files:
        raise UsageError(f"{folder} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))}; hidden ones are skipped)")
    sources = []
    for file in files:
        relative = file.relative_to(folder)
        sources.append((str(relative.with_suffix("")), relative.parts[0] if len(relative.parts) > 1 else "", file))
    return sources


def manifest_images(manifest: pathlib.Path) -> list[Source]:
    """The rows of a CSV manifest (UTF-8, with or without Excel's BOM; cells stripped of spaces;
    a first cell `path` is a header)."""
    try:
        with open(manifest, newline="", encoding="utf-8-sig") as handle:
            reader = csv.reader(handle)
            rows = [(reader.line_num, [cell.strip() for cell in row]) for row in reader]
    except UnicodeDecodeError:
        raise UsageError(f"{manifest}: not UTF-8 text; save it as CSV UTF-8") from None
    except OSError as exc:
        raise UsageError(f"{manifest}: cannot read it ({exc.strerror or exc})") from None
    return [manifest_row(manifest, line, row) for line, row in rows if any(row) and row[0] != "path"]


def manifest_row(manifest: pathlib.Path, line: int, row: list[str]) -> Source:
    """A manifest row's image: a path relative to the manifest's folder, or an absolute one under it."""
    given = pathlib.Path(row[0])
    if given.is_absolute():
        folder = manifest.parent.resolve()
        try:
            given = (given.parent.resolve() / given.name).relative_to(folder)
        except ValueError:
            raise UsageError(f"{manifest} line {line}: {row[0]} is outside the manifest's folder {folder}; "
                             "ids are paths relative to it, so list files under it") from None
    file = manifest.parent / given
    if not file.is_file():
        raise UsageError(f"{manifest} line {line}: {row[0]} not found (paths are relative to the manifest)")
    return str(given.with_suffix("")), row[1] if len(row) > 1 else "", file


def check_unique_ids(sources: list[Source]) -> None:
    """UsageError naming both files when two images would get one id (one would replace the other)."""
    seen = {}
    for item_id, _, file in sources:
        if item_id in seen:
            raise UsageError(f"{seen[item_id]} and {file} would both be item {item_id!r} (an id is the path "
                             "without its extension, so one would replace the other): rename or remove one")
        seen[item_id] = file


def read_items(path: pathlib.Path) -> Iterator[tuple[str, str, bytes]]:
    """(id, label, bytes) of each image of a folder or CSV manifest (see image_files); a file that
    cannot be read raises OSError (`convsearch ingest` reports it as a failed item instead)."""
    for item_id, label, file in image_files(path):
        yield item_id, label, file.read_bytes()


def minkowski_p(args, metrics, option: str) -> float:
    """--p when minkowski is among the metrics (required: the gateway refuses an unset p rather
    than assume 2); other metrics ignore p."""
    if "minkowski" not in metrics:
        return Configuration.minkowski_p
    if args.p is None:
        raise UsageError(f"{option} minkowski needs --p, its p (1 to 100; chebyshev is p = infinity)")
    return args.p


def configuration(args) -> Configuration:
    return Configuration(args.model, tuple(args.layers or ()), args.pooling, args.metric,
                         minkowski_p(args, [args.metric], "--metric"))


def ensure_dataset(client: Client, dataset: str) -> None:
    """Creates the dataset unless it exists; another ingest creating it meanwhile is no failure."""
    try:
        client.dataset(dataset)
    except NotFound:
        try:
            client.create_dataset(dataset)
        except AlreadyExists:
            pass


def run_ingest(client: Client, dataset: str, path: pathlib.Path) -> dict:
    """Ingests a folder or manifest, reading each file as it is sent; a file that cannot be read
    is a failed item, like an image the gateway refuses."""
    sources = image_files(path)
    ensure_dataset(client, dataset)
    counts = {"stored": 0, "replaced": 0, "failed": 0}
    failures = []

    def readable():
        for item_id, label, file in sources:
            try:
                data = file.read_bytes()
            except OSError as exc:
                counts["failed"] += 1
                failures.append(f"{item_id}: cannot read {file} ({exc.strerror or exc})")
                continue
            yield item_id, label, data

    for result in client.ingest(dataset, readable()):
        counts[result.status] += 1
        if result.error:
            failures.append(f"{result.id}: {result.error}")
        progress("ingest", sum(counts.values()), len(sources))
    progress("ingest", sum(counts.values()), len(sources), final=True)
    for failure in failures[:10]:
        print(f"  failed {failure}", file=sys.stderr)
    return {"dataset": dataset, **counts}


def run_index(client: Client, dataset: str, config: Configuration, rebuild_damaged: bool = False) -> dict:
    last = None
    for last in client.index(dataset, [config], rebuild_damaged=rebuild_damaged):
        progress("index ", last.done, last.total, last.images_per_second, final=last.finished)
    return {"dataset": dataset, "collections": list(last.collections), "embedded": last.done - last.failed,
            "failed": last.failed, "images_per_second": round(last.images_per_second, 1), "errors": list(last.errors)}


def weights_mark(pretrained: bool, weights: str) -> str:
    """A result's weights for a table: plain when pretrained, a loud marker otherwise."""
    if weights == NO_WEIGHTS:
        return "none"
    if pretrained:
        return "pretrained"
    return "RANDOM (!)" if weights == "random" else "UNKNOWN (!)"


NOT_PRETRAINED = ("warning: results marked (!) come from random or unrecorded weights, not pretrained ones; "
                  "they say nothing about the model")


def search_rows(result) -> list[dict]:
    return [{"rank": rank, "id": hit.id, "label": hit.label, "distance": f"{round(hit.distance, 4) + 0.0:.4f}",
             "match": "" if not result.query_label else ("yes" if hit.label == result.query_label else "NO")}
            for rank, hit in enumerate(result.hits, 1)]


# ---- commands ----------------------------------------------------------------------------

def tls_options(args) -> dict:
    """The Client's TLS arguments from the top-level flags (None: the environment variable)."""
    return {"tls_ca": args.tls_ca, "tls_cert": args.tls_cert, "tls_key": args.tls_key}


UP_PORT_OPTIONS = {"gateway": "--port", "extractor": "--extractor-port", "index": "--index-port",
                   "web": "--web-port"}


def up_ports(args) -> dict[str, int]:
    """The port `up` gives each service (0: a free one); the web page's unless --no-web."""
    ports = {"gateway": args.port, "extractor": args.extractor_port, "index": args.index_port}
    return ports if args.no_web else {**ports, "web": args.web_port}


def port_in_use(host: str, port: int) -> bool:
    """Whether something already listens on host:port (or it cannot be bound there)."""
    probe_host = "127.0.0.1" if host in ("0.0.0.0", "", "::") else host
    with socket.socket() as sock:
        sock.settimeout(0.5)
        if sock.connect_ex((probe_host, port)) == 0:  # something answers: another process serves there
            return True
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as gRPC does: TIME_WAIT is no conflict
            sock.bind((host, port))
    except OSError as exc:
        return exc.errno == errno.EADDRINUSE  # other errors (an address not on this machine): the service's to report
    return False


def busy_port_message(host: str, port: int, service: str) -> str:
    option = UP_PORT_OPTIONS[service]
    return (f"port {port} on {host} (the {service}'s) is already in use by another process: stop that process "
            f"or pass another {option}, e.g. {option} 0 for a free one")


def check_up_ports(args) -> None:
    """UsageError (exit 2) naming the first port `up` needs that is taken (before starting anything)."""
    ports = up_ports(args)
    chosen = [port for port in ports.values() if port]
    for service, port in ports.items():
        try:
            check_port(port, UP_PORT_OPTIONS[service])
        except ValueError as exc:
            raise UsageError(f"{exc} (0: a free one)") from None
        if port and chosen.count(port) > 1:
            raise UsageError(f"port {port} is given to more than one service; pass different --port, "
                             "--extractor-port, --index-port and --web-port")
        if port and port_in_use(args.host, port):
            raise UsageError(busy_port_message(args.host, port, service))


def cmd_up(args) -> int:
    data_dir = pathlib.Path(args.data_dir)
    extractor_args = ("--device", args.device) + (("--allow-random-weights",) if args.allow_random_weights else ())
    check_up_ports(args)
    print(f"starting extractor, index, gateway{'' if args.no_web else ' and the web page'} "
          f"(data in {data_dir.resolve()}) ...", file=sys.stderr)
    stack = LocalStack(data_dir, args.port or None, args.extractor_port or None, args.index_port or None,
                       extractor_args, host=args.host, web=not args.no_web, web_port=args.web_port or None)
    exited = stack.exited()
    if exited:  # it lost the port to another process between the check and its start: that one answered
        return up_failed(args, stack, exited)
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    emit(args, {"gateway": stack.gateway, "extractor": stack.extractor, "index": stack.index,
                **({"web": stack.web_url} if stack.web_url else {})})
    if not args.json:
        web = f"web page   {stack.web_url}  (open it in a browser)\n" if stack.web_url else ""
        print(f"gateway    {stack.gateway}\nextractor  {stack.extractor}\nindex      {stack.index}\n{web}"
              "all healthy; Ctrl-C stops them", flush=True)
    while not stop.wait(0.5):
        exited = stack.exited()
        if exited:
            return up_failed(args, stack, exited)
    stack.stop()
    print("stopped", file=sys.stderr)
    return 0


def up_failed(args, stack: LocalStack, exited: list[str]) -> int:
    """A service of `up` exited on its own: stop the others and say why (2 when it could not
    listen on its port, 1 otherwise)."""
    logs = stack.stop()
    for service in exited:
        log = logs.get(service, "")
        if "cannot listen on" in log:
            port = getattr(args, UP_PORT_OPTIONS[service].lstrip("-").replace("-", "_"))
            return failed(args, UsageError(busy_port_message(args.host, port, service)), 2, prefix="")
    last_lines = "\n".join(logs.get(exited[0], "").strip().splitlines()[-10:])
    return failed(args, RuntimeError(f"the {exited[0]} exited; stopped the others. Its last log lines:\n{last_lines}"),
                  1, prefix="")


def cmd_models(args, client: Client) -> int:
    models = client.models(all_layers=args.all_layers)
    rows = [{"model": m.name, "input": m.input_size, "params": f"{m.parameter_count:,}",
             "weights": "none" if m.weights == NO_WEIGHTS else "pretrained" if m.pretrained
             else ("random" if m.available else "missing"),
             "featured layers": " ".join(layer.name for layer in m.layers if layer.featured)} for m in models]
    emit(args, models, rows, ["model", "input", "params", "weights", "featured layers"])
    return 0


def cmd_datasets(args, client: Client) -> int:
    datasets = client.datasets()
    rows = [{"dataset": d.name, "items": d.item_count, "collections": d.collection_count,
             "description": d.description} for d in datasets]
    # ListDatasets carries each dataset's collection_count, not its collections: the JSON leaves
    # `collections` out rather than show an empty list beside a non-zero count.
    listing = [{"name": d.name, "description": d.description, "item_count": d.item_count,
                "collection_count": d.collection_count, "created": d.created.isoformat()} for d in datasets]
    emit(args, listing, rows, ["dataset", "items", "collections", "description"])
    return 0


def cmd_ingest(args, client: Client) -> int:
    summary = run_ingest(client, args.dataset, pathlib.Path(args.path))
    emit(args, summary, [summary], ["dataset", "stored", "replaced", "failed"])
    return 0 if summary["failed"] == 0 else 1


def cmd_index(args, client: Client) -> int:
    summary = run_index(client, args.dataset, configuration(args), args.rebuild_damaged)
    rows = [{"collection": name} for name in summary["collections"]]
    emit(args, summary, rows, ["collection"])
    if not args.json:
        print(f"embedded {summary['embedded']}, failed {summary['failed']}")
    return 0 if summary["failed"] == 0 else 1


def cmd_search(args, client: Client) -> int:
    image = read_file(args.image, "--image") if args.image else None
    result = client.search(args.dataset, image=image, item_id=args.id, configuration=configuration(args), k=args.k)
    emit(args, result, search_rows(result), ["rank", "id", "label", "distance", "match"])
    if not args.json and result.search_score is not None:
        print(f"query label {result.query_label}: {result.same_label_count} / {result.scored_results} results in "
              f"the same category, search score {result.search_score:.2f}%")
    if not args.json and not result.pretrained:
        print(f"warning: {result.collection} was made with {'random' if result.weights == 'random' else 'unknown'} "
              "weights, not pretrained ones; these results say nothing about the model")
    return 0


def model_mark(score) -> str:
    """A score's model for a table, the baseline labelled as such."""
    return f"{score.model} (baseline)" if score.baseline else score.model


def score_rows(scores) -> list[dict]:
    return [{"model": model_mark(s), "layer": s.layer, "metric": s.metric, "score": f"{s.mean_score:.2f}",
             f"P@{s.k}": f"{s.precision_at_k:.3f}", f"mAP@{s.k}": f"{s.map_at_k:.3f}", "dims": s.dimension,
             "params": f"{s.parameter_count:,}", "weights": weights_mark(s.pretrained, s.weights)} for s in scores]


def run_evaluate(client: Client, dataset: str, **options):
    last = None
    for last in client.evaluate(dataset, **options):
        label = "index   " if last.phase == "indexing" else "evaluate"
        progress(label, last.done, last.total, final=last.finished)
    return last.results


def evaluated(args, client: Client) -> dict:
    """What `evaluate` scores: models x metrics, or with minkowski (whose p the gateway takes only
    in a configuration) the same as explicit configurations carrying --p."""
    metrics = args.metrics or []
    if "minkowski" not in metrics:
        return {"models": args.models or (), "metrics": metrics}
    p = minkowski_p(args, metrics, "--metrics")
    models = args.models or [model.name for model in client.models() if model.available]
    return {"configurations": [Configuration(model, metric=metric, minkowski_p=p)
                               for model in models for metric in metrics]}


def cmd_evaluate(args, client: Client) -> int:
    results = run_evaluate(client, args.dataset, **evaluated(args, client), k=args.k, recompute=args.recompute)
    columns = ["model", "layer", "metric", "score", f"P@{args.k}", f"mAP@{args.k}", "dims", "params", "weights"]
    emit(args, results, score_rows(results), columns)
    if results and not args.json:
        best = results[0]
        unlabeled = f", {best.unlabeled} unlabeled items: not queries, misses in results" if best.unlabeled else ""
        print(f"best: {best.model} {best.layer} {best.metric} ({best.mean_score:.2f}% over {best.queries} queries"
              f"{unlabeled})")
        if best.single_item_classes:
            print(f"note: {best.single_item_classes} classes have a single item; it can only score 0")
        if best.small_dataset:
            print("note: fewer than 16 items; the search score uses the ranks there are, P@k and mAP@k do not")
        if not all(score.pretrained for score in results):
            print(NOT_PRETRAINED)
    if args.plot:
        from convsearch import plots

        plots.scores_per_layer(results, pathlib.Path(args.plot), f"{args.dataset}: mean search score per layer")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_compare(args, client: Client) -> int:
    comparison = client.compare(args.dataset, args.id or "")
    if args.id:
        by_collection = dict(comparison.item_scores)
        rows = [{"model": model_mark(s), "layer": s.layer, "metric": s.metric,
                 "item score": f"{by_collection[s.collection]:.2f}", "mean score": f"{s.mean_score:.2f}",
                 "weights": weights_mark(s.pretrained, s.weights)}
                for s in comparison.ranked if s.collection in by_collection]
        emit(args, comparison, rows, ["model", "layer", "metric", "item score", "mean score", "weights"])
    else:
        rows = [{"model": model_mark(s), "best layer": s.layer, "metric": s.metric, "score": f"{s.mean_score:.2f}",
                 "weights": weights_mark(s.pretrained, s.weights)}
                for model, s in sorted(comparison.best_layer_per_model.items(), key=lambda kv: -kv[1].mean_score)]
        emit(args, comparison, rows, ["model", "best layer", "metric", "score", "weights"])
    if not args.json and not all(score.pretrained for score in comparison.ranked):
        print(NOT_PRETRAINED)
    if not comparison.ranked and not comparison.stale and not args.json:
        print(f"nothing evaluated in {args.dataset} yet: run convsearch evaluate --dataset {args.dataset}",
              file=sys.stderr)
    if comparison.stale and not args.json:
        print(f"not current (run evaluate): {', '.join(comparison.stale)}", file=sys.stderr)
    return 0


def cmd_project(args, client: Client) -> int:
    points = client.project(args.dataset, configuration(args), args.method, args.seed, args.max_points)
    data = {"collection": points.collection, "total": points.total, "sampled": points.sampled,
            "points": [{"id": i, "label": label, "x": x, "y": y}
                       for i, label, x, y in zip(points.ids, points.labels, points.x, points.y, strict=True)]}
    emit(args, data)
    if not args.json:
        print(f"{len(points.ids)} points of {points.collection}"
              f"{f' (a sample of {points.total})' if points.sampled else ''}")
    if args.plot:
        from convsearch import plots

        plots.projection(points, pathlib.Path(args.plot), f"{points.collection} ({args.method})")
        print(f"wrote {args.plot}", file=sys.stderr)
    return 0


def cmd_inspect(args, client: Client) -> int:
    if args.id and not args.dataset:
        raise UsageError("--id needs --dataset, the dataset the item is in")
    image = read_file(args.image, "--image") if args.image else None
    out = output_folder(args.out, "--out")
    found = client.inspect(args.layer, image=image, dataset=args.dataset or "", item_id=args.id or "",
                           model=args.model, top_channels=args.top)
    rows = []
    for rank, (channel, mean, png) in enumerate(found.channels, 1):
        path = out / f"{found.layer.replace('/', '_')}-{rank:02d}-channel{channel}.png"
        path.write_bytes(png)
        rows.append({"rank": rank, "channel": channel, "mean activation": f"{mean:.4f}", "file": str(path)})
    emit(args, {"model": found.model, "layer": found.layer, "output_shape": found.output_shape,
                "parameter_count": found.parameter_count, "channels": rows}, rows,
         ["rank", "channel", "mean activation", "file"])
    if not args.json:
        print(f"{found.model} {found.layer}: output {list(found.output_shape)}, "
              f"{found.parameter_count:,} parameters up to here")
    return 0


def cmd_delete_dataset(args, client: Client) -> int:
    client.delete_dataset(args.name)
    emit(args, {"deleted": args.name})
    return 0


def cmd_delete_collection(args, client: Client) -> int:
    client.delete_collection(args.dataset, args.collection)
    emit(args, {"dataset": args.dataset, "deleted": args.collection})
    return 0


def cmd_snapshot(args, client: Client) -> int:
    """`snapshot create|list|restore|delete`: the index's snapshots of datasets (admin only)."""
    if args.snapshot_command == "create":
        snapshot, deleted = client.snapshot(args.dataset)
        emit(args, {"snapshot": snapshot, "deleted": deleted},
             [{"snapshot": snapshot.name, "dataset": snapshot.dataset, "bytes": snapshot.size_bytes,
               "deleted": ", ".join(deleted)}], ["snapshot", "dataset", "bytes", "deleted"])
    elif args.snapshot_command == "list":
        snapshots = client.snapshots(args.dataset)
        emit(args, snapshots, [{"snapshot": s.name, "dataset": s.dataset, "bytes": s.size_bytes,
                                "created": s.created.strftime("%Y-%m-%d %H:%M:%S")}
                               for s in snapshots], ["snapshot", "dataset", "bytes", "created"])
    elif args.snapshot_command == "restore":
        dataset = client.restore(args.snapshot, args.dataset)
        emit(args, dataset, [{"dataset": dataset.name, "items": dataset.item_count,
                              "collections": dataset.collection_count}], ["dataset", "items", "collections"])
    else:
        client.delete_snapshot(args.snapshot)
        emit(args, {"deleted": args.snapshot}, [{"deleted": args.snapshot}], ["deleted"])
    return 0


def cmd_rebalance(args) -> int:
    """`rebalance`: moves each dataset that is not on the index primary owning it there (see
    convsearch.rebalance); with --dry-run only says which. 0 when nothing was skipped."""
    try:
        names = parse_primaries(args.index)
        for name in names:
            check_address(name, "--index")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    moves = []
    with Primaries(names, client_credentials(args.tls_ca, args.tls_cert, args.tls_key)) as primaries:
        for done in rebalance(primaries, args.dry_run):
            moves.append(done)
            if not args.json:
                verb = {"planned": "would move", "moved": "moved", "skipped": "skipped"}[done.status]
                counts = f" ({done.items} items, {done.collections} collections)" if done.status == "moved" else ""
                print(f"{verb} {done.dataset}: {done.source} -> {done.target}{counts}"
                      + (f": {done.reason}" if done.reason else ""), flush=True)
    skipped = sum(m.status == "skipped" for m in moves)
    if args.json:
        print(json.dumps({"primaries": names, "dry_run": args.dry_run, "moves": [dataclasses.asdict(m) for m in moves]},
                         indent=2))
    elif not moves:
        print("nothing to move: every dataset is on the primary that owns it")
    elif not args.dry_run:
        print(f"{len(moves) - skipped} moved, {skipped} skipped" + ("; run again to retry those" if skipped else ""))
    return 1 if skipped else 0


def demo(client: Client) -> int:
    config = Configuration(DEMO_MODEL)
    print(f"ingesting fashion200 (Fashion-MNIST, 10 classes x 20) from {FASHION200} ...")
    ingested = run_ingest(client, "fashion200", FASHION200)
    print(f"  stored {ingested['stored']}, replaced {ingested['replaced']}, failed {ingested['failed']}")
    print(f"indexing with {DEMO_MODEL} at its featured layers, cosine ...")
    indexed = run_index(client, "fashion200", config)
    print(f"  {len(indexed['collections'])} collections; embedded {indexed['embedded']} images")
    layer = indexed["collections"][-1].split("/")[1]
    first_of_class = {}
    for item_id, label, _ in read_items(FASHION200):
        first_of_class.setdefault(label, item_id)
    scores = []
    for label, item_id in first_of_class.items():
        result = client.search("fashion200", item_id=item_id, configuration=Configuration(DEMO_MODEL, (layer,)), k=5)
        scores.append(result.search_score)
        marks = " ".join(("" if hit.label == label else "x") + hit.label for hit in result.hits)
        print(f"{item_id:28} {label:11} score {result.search_score:6.2f}%  "
              f"{result.same_label_count:2d}/15 same  top 5: {marks}")
    print(f"mean of these {len(scores)} at {layer}: {sum(scores) / len(scores):.2f}% "
          "(x marks a result of another class)")
    print(f"\nfashion200 search score per {DEMO_MODEL} featured layer (all 200 queries, cosine):")
    results = run_evaluate(client, "fashion200", models=[DEMO_MODEL], metrics=["cosine"])
    by_depth = sorted(results, key=lambda s: s.parameter_count)
    for score in by_depth:
        print(f"  {score.layer:28} {score.mean_score:6.2f}%  {'#' * round(score.mean_score / 2)}")
    print(f"best layer: {results[0].layer} ({results[0].mean_score:.2f}%)")
    return 0


def cmd_demo(args) -> int:
    channel = create_channel(checked_address(args.gateway, "--gateway"),
                             credentials=client_credentials(args.tls_ca, args.tls_cert, args.tls_key))
    try:
        wait_until_serving(channel, GATEWAY, timeout_s=1.0)
        running = True
    except TimeoutError:
        running = False
    finally:
        channel.close()
    if running and not args.fresh:
        with Client(args.gateway, **tls_options(args), api_key=args.api_key) as client:
            return demo(client)
    print("starting extractor, index and gateway for the demo ...", flush=True)
    with tempfile.TemporaryDirectory() as data_dir, LocalStack(pathlib.Path(data_dir)) as stack:
        with Client(stack.gateway, tls_ca="", tls_cert="", tls_key="") as client:  # a local plaintext stack
            return demo(client)


# ---- parsing -----------------------------------------------------------------------------

MINKOWSKI_P_HELP = "p of the minkowski metric, 1 to 100: required with minkowski, ignored by other metrics"


def add_output_options(parser: argparse.ArgumentParser, default=False) -> None:
    parser.add_argument("--json", action="store_true", default=default,
                        help="print JSON for scripts instead of tables")


def add_tls_options(parser: argparse.ArgumentParser, default=None) -> None:
    parser.add_argument("--tls-ca", default=default,
                        help=f"PEM CA to verify the server's certificate with: TLS (env {ENV_CA})")
    parser.add_argument("--tls-cert", default=default, help=f"PEM client certificate for mutual TLS (env {ENV_CERT})")
    parser.add_argument("--tls-key", default=default, help=f"PEM private key of --tls-cert (env {ENV_KEY})")


def add_gateway_options(parser: argparse.ArgumentParser, gateway=None, api_key=None) -> None:
    parser.add_argument("--gateway", default=gateway,
                        help=f"gateway address (env {ENV_GATEWAY}; default {DEFAULT_GATEWAY})")
    parser.add_argument("--api-key", default=api_key, help=f"API key the gateway asks for, sent as "
                                                           f"`authorization: Bearer KEY` (env {ENV_API_KEY})")


def parser() -> argparse.ArgumentParser:
    """The command line. Options of the connection and output (--gateway, --api-key, --tls-*,
    --json) go before or after the subcommand: the subcommands' copies default to SUPPRESS, so a
    value given before the subcommand is kept unless given again after it."""
    top = argparse.ArgumentParser(prog="convsearch", description="ConvNet Search: semantic image search with CNNs.")
    add_gateway_options(top, gateway=os.environ.get(ENV_GATEWAY) or DEFAULT_GATEWAY)
    add_output_options(top)
    add_tls_options(top)
    output = argparse.ArgumentParser(add_help=False)
    add_output_options(output, default=argparse.SUPPRESS)
    secured = argparse.ArgumentParser(add_help=False, parents=[output])  # `health`: TLS, no gateway
    add_tls_options(secured, default=argparse.SUPPRESS)
    connected = argparse.ArgumentParser(add_help=False, parents=[secured])  # commands that call the gateway
    add_gateway_options(connected, gateway=argparse.SUPPRESS, api_key=argparse.SUPPRESS)
    subparsers = top.add_subparsers(dest="command", required=True)

    class Commands:
        """add_parser with the shared options: `connected` unless told otherwise."""

        @staticmethod
        def add_parser(name, parents=(connected,), **kwargs):
            return subparsers.add_parser(name, parents=list(parents), **kwargs)

    commands = Commands()

    up = commands.add_parser("up", parents=(output,),
                             help="run extractor, index, gateway and the web page locally until Ctrl-C")
    up.add_argument("--data-dir", default="./data", help="where the index keeps its data (default %(default)s)")
    up.add_argument("--host", default="127.0.0.1")
    up.add_argument("--port", type=int, default=50051, help="gateway port (0: a free one)")
    up.add_argument("--extractor-port", type=int, default=50052, help="0: a free one")
    up.add_argument("--index-port", type=int, default=50053, help="0: a free one")
    up.add_argument("--web-port", type=int, default=8080, help="the web page's HTTP port (0: a free one)")
    up.add_argument("--no-web", action="store_true", help="start no web page")
    up.add_argument("--device", default="auto")
    up.add_argument("--allow-random-weights", action="store_true")

    models = commands.add_parser("models", help="list models and their featured layers")
    models.add_argument("--all-layers", action="store_true")
    commands.add_parser("datasets", help="list datasets")
    delete = commands.add_parser("delete-dataset", help="delete a dataset with its items and collections")
    delete.add_argument("name")
    delete_collection = commands.add_parser(
        "delete-collection", help="delete one collection of a dataset (the items stay), e.g. to index it with other "
                                  "weights")
    delete_collection.add_argument("--dataset", required=True)
    delete_collection.add_argument("collection", help="its name, as GetDataset lists it: model/layer/pooling/metric")

    snapshot = commands.add_parser("snapshot", help="snapshots of datasets on the index server (admin)")
    snapshot_commands = snapshot.add_subparsers(dest="snapshot_command", required=True)
    snapshot_commands.add_parser("create", parents=[connected], help="write a snapshot of a dataset").add_argument(
        "dataset")
    snapshot_commands.add_parser("list", parents=[connected], help="the snapshots kept, oldest first").add_argument(
        "dataset", nargs="?", default="", help="only this dataset's (default: all)")
    restore = snapshot_commands.add_parser("restore", parents=[connected], help="restore a snapshot as a new dataset")
    restore.add_argument("snapshot")
    restore.add_argument("--dataset", required=True, help="name of the new dataset")
    snapshot_commands.add_parser("delete", parents=[connected], help="delete a snapshot").add_argument("snapshot")

    ingest = commands.add_parser("ingest", help="store a folder (sub-folders are labels) or a CSV manifest")
    ingest.add_argument("path")
    ingest.add_argument("--dataset", required=True)

    def add_configuration(command, layers_help):
        command.add_argument("--dataset", required=True)
        command.add_argument("--model", default="", help="default: the extractor's default model")
        command.add_argument("--layers", "--layer", nargs="*", help=layers_help)
        command.add_argument("--pooling", default="avg", choices=list(POOLING_ENUMS))
        command.add_argument("--metric", default="cosine", choices=list(METRIC_ENUMS))
        command.add_argument("--p", type=float, help=MINKOWSKI_P_HELP)

    index = commands.add_parser("index", help="embed and index a dataset at a configuration")
    add_configuration(index, "default: the model's featured layers")
    index.add_argument("--rebuild-damaged", action="store_true",
                       help="delete and rebuild, from the dataset's items, collections whose files are damaged")
    search = commands.add_parser("search", help="nearest items to an image file or a stored item")
    add_configuration(search, "one layer; default: the model's last featured layer")
    query = search.add_mutually_exclusive_group(required=True)
    query.add_argument("--image", help="an image file")
    query.add_argument("--id", help="a stored item's id")
    search.add_argument("--k", type=int, default=15)

    evaluate = commands.add_parser("evaluate", help="score models x layers x metrics on a labeled dataset")
    evaluate.add_argument("--dataset", required=True)
    evaluate.add_argument("--models", nargs="*", help="default: every available model, at its featured layers")
    evaluate.add_argument("--metrics", nargs="*", choices=list(METRIC_ENUMS), help="default: cosine")
    evaluate.add_argument("--p", type=float, help=MINKOWSKI_P_HELP)
    evaluate.add_argument("--k", type=int, default=15, help="k of P@k and mAP@k")
    evaluate.add_argument("--recompute", action="store_true", help="ignore stored results")
    evaluate.add_argument("--plot", help="write a chart of mean score per layer for each model to this PNG")
    compare = commands.add_parser("compare", help="best layer per model, or one item's score per configuration")
    compare.add_argument("--dataset", required=True)
    compare.add_argument("--id", help="an item: its score under each evaluated configuration")
    project = commands.add_parser("project", help="2-D projection (PCA or UMAP) of a collection")
    add_configuration(project, "one layer; default: the model's last featured layer")
    project.add_argument("--method", choices=["pca", "umap"], default="pca")
    project.add_argument("--seed", type=int, default=0)
    project.add_argument("--max-points", type=int, default=5000)
    project.add_argument("--plot", help="write a scatter coloured by label to this PNG")
    inspect = commands.add_parser("inspect", help="a layer's strongest channels for an image, as PNG overlays")
    inspect_query = inspect.add_mutually_exclusive_group(required=True)
    inspect_query.add_argument("--image", help="an image file")
    inspect_query.add_argument("--id", help="a stored item's id (with --dataset)")
    inspect.add_argument("--dataset")
    inspect.add_argument("--model", default="")
    inspect.add_argument("--layer", required=True)
    inspect.add_argument("--top", type=int, default=0,
                         help="how many of the strongest channels (default: 8, or every channel of a layer with fewer)")
    inspect.add_argument("--out", required=True, help="folder for the PNG files")

    api_key = commands.add_parser("api-key", parents=(output,),
                                  help="make an API key and its line for the gateway's --api-keys file")
    api_key_commands = api_key.add_subparsers(dest="api_key_command", required=True)
    make_key = api_key_commands.add_parser("new", parents=[output],
                                           help="a fresh key (printed once) and the line that admits it")
    hashed = api_key_commands.add_parser("hash", parents=[output],
                                         help="the line that admits an existing key (read from stdin)")
    for command in (make_key, hashed):
        command.add_argument("--role", required=True, choices=ROLES,
                             help="read: search and look; write: also ingest, index, delete items; "
                                  "admin: also create and delete datasets and collections")
        command.add_argument("--datasets", default="", help="comma-separated datasets it may touch (default: all)")
        command.add_argument("--comment", default="", help="a note kept on the line, e.g. who holds the key")
        command.add_argument("--append", metavar="FILE", help="append the line to this keys file")

    health = commands.add_parser("health", parents=(secured,),
                                 help="ask any service's grpc.health.v1 (exit 0 when SERVING)")
    health.add_argument("address", help="host:port of a gateway, extractor or index")
    health.add_argument("service", nargs="?", default="",
                        help="health name, e.g. convsearch.index.v1.IndexService or liveness (default: the server)")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds to wait for the answer")

    rebalance_command = commands.add_parser(
        "rebalance", parents=(secured,),
        help="move datasets to the index primaries that own them (after adding a primary), via snapshots")
    rebalance_command.add_argument("--index", required=True,
                                   help="every index primary, comma-separated, named exactly as the gateway's --index")
    rebalance_command.add_argument("--dry-run", action="store_true", help="print the moves without making them")

    demo_command = commands.add_parser("demo", help="ingest fashion200, index it with lite0, "
                                                    "search one image per class")
    demo_command.add_argument("--fresh", action="store_true", help="start new local services even if a gateway runs")
    return top


def cmd_api_key(args) -> int:
    """`api-key new`: a fresh key and its keys-file line; `api-key hash`: the line of a key read from stdin."""
    key = new_key() if args.api_key_command == "new" else sys.stdin.readline().strip()
    if not key:
        raise UsageError("no key on stdin")
    try:
        line = key_line(key, args.role, [name for name in args.datasets.split(",") if name], args.comment)
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    if args.append:
        try:
            with open(args.append, "a", encoding="utf-8") as file:
                file.write(line + "\n")
        except OSError as exc:  # bad usage naming the file, as for the files a command reads
            raise UsageError(f"--append {args.append}: cannot write to it ({exc.strerror or exc}); "
                             "name a keys file you can write, in a folder that exists") from None
    if args.json:
        print(json.dumps({"key": key, "line": line} if args.api_key_command == "new" else {"line": line}))
    elif args.api_key_command == "new":
        print(f"key:  {key}\n      (give it to its holder now: only its hash is kept)\nline: {line}"
              + (f"\n      (appended to {args.append})" if args.append else ""))
    else:
        print(line)
    return 0


def cmd_health(args) -> int:
    """One grpc.health.v1 check: exit 0 when SERVING, 1 when not, 3 when nothing answers."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = create_channel(checked_address(args.address, "address"),
                             credentials=client_credentials(args.tls_ca, args.tls_cert, args.tls_key))
    try:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=args.service),
                                                          timeout=args.timeout)
    except grpc.RpcError as exc:
        if exc.code() == grpc.StatusCode.NOT_FOUND:
            raise NotFound(f"{args.address}: no health status for service {args.service!r}",
                           metadata={"address": args.address, "service": args.service}) from None
        raise Unavailable(f"{args.address}: unreachable ({exc.code().name}: {exc.details()})",
                          metadata={"address": args.address}) from None
    finally:
        channel.close()
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    emit(args, {"address": args.address, "service": args.service, "status": status},
         [{"address": args.address, "service": args.service or "(server)", "status": status}],
         ["address", "service", "status"])
    return 0 if reply.status == health_pb2.HealthCheckResponse.SERVING else 1


HANDLERS = {"models": cmd_models, "datasets": cmd_datasets, "ingest": cmd_ingest, "index": cmd_index,
            "search": cmd_search, "delete-dataset": cmd_delete_dataset, "delete-collection": cmd_delete_collection,
            "evaluate": cmd_evaluate, "compare": cmd_compare, "project": cmd_project, "inspect": cmd_inspect,
            "snapshot": cmd_snapshot}


LOCAL_ERRORS = ((UsageError, "INVALID_ARGUMENT", "USAGE"), (TLSError, "INVALID_ARGUMENT", "TLS"),
                (KeyboardInterrupt, "CANCELLED", "INTERRUPTED"))
"""(exception, code, reason) of the failures the CLI meets itself, for --json's error object."""


def error_object(exc: BaseException, message: str) -> dict:
    """--json's description of a failure: a service's code, reason and metadata, or the CLI's own."""
    if isinstance(exc, ConvsearchError):
        return {"code": exc.code, "reason": exc.reason, "message": message, "metadata": exc.metadata}
    code, reason = next(((code, reason) for kind, code, reason in LOCAL_ERRORS if isinstance(exc, kind)),
                        ("UNKNOWN", "LOCAL_ERROR"))
    return {"code": code, "reason": reason, "message": message, "metadata": {"exception": type(exc).__name__}}


def failed(args, exc: BaseException, exit_code: int, prefix: str | None = None) -> int:
    """Reports a failure as one line on stderr (prefixed with the exception's type unless given)
    and, under --json, as {"error": {...}} on stdout; returns the exit code."""
    message = str(exc) or "interrupted"
    prefix = f"{type(exc).__name__}: " if prefix is None else prefix
    print(f"convsearch: {prefix}{message}", file=sys.stderr)
    if getattr(args, "json", False):
        print(json.dumps({"error": error_object(exc, message)}))
    return exit_code


def run_command(args) -> int:
    if args.command == "up":
        return cmd_up(args)
    if args.command == "demo":
        return cmd_demo(args)
    if args.command == "health":
        return cmd_health(args)
    if args.command == "rebalance":
        return cmd_rebalance(args)
    if args.command == "api-key":
        return cmd_api_key(args)
    with Client(checked_address(args.gateway, "--gateway"), **tls_options(args), api_key=args.api_key) as client:
        return HANDLERS[args.command](args, client)


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    try:
        return run_command(args)
    except UsageError as exc:
        return failed(args, exc, 2, prefix="")
    except Unavailable as exc:
        return failed(args, exc, 3, prefix="")
    except TLSError as exc:
        return failed(args, exc, 2, prefix="TLS: ")
    except (ConvsearchError, RuntimeError, OSError) as exc:
        return failed(args, exc, 1)
    except KeyboardInterrupt as exc:
        return failed(args, exc, 130, prefix="")


if __name__ == "__main__":
    sys.exit(main())
