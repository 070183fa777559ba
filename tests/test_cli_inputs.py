"""What users feed the CLI and the Python client: folders with clashing, hidden or odd entries,
Excel's CSV manifests, ports and addresses out of range, minkowski without p, --json errors, and
client arguments the gateway would refuse or that lose the caller's exception."""

import json
import os
import pathlib
import shutil
from concurrent import futures

import grpc
import pytest

from convsearch import cli
from convsearch.cli import FASHION200, main, parser, read_items
from convsearch.client import Client, EvaluationProgress, IngestResult, Model
from convsearch.embedding import Configuration
from convsearch.errors import AlreadyExists, InvalidArgument, NotFound, Unavailable
from convsearch.gateway.v1 import gateway_pb2 as pb
from convsearch.gateway.v1 import gateway_pb2_grpc

UNREACHABLE = "127.0.0.1:1"
SAMPLE = sorted((FASHION200 / "bag").glob("*.png"))[0]


class Gateway:
    """A stand-in for Client in the CLI's commands: records what they send."""

    def __init__(self, exists: bool = True, created_meanwhile: bool = False):
        self.exists, self.created_meanwhile = exists, created_meanwhile
        self.ingested, self.evaluated = [], {}

    def dataset(self, name):
        if not self.exists:
            raise NotFound(f"dataset {name!r} not found")

    def create_dataset(self, name):
        if self.created_meanwhile:  # another `convsearch ingest` created it since dataset() said NotFound
            raise AlreadyExists(f"dataset {name!r} already exists")

    def ingest(self, dataset, items):
        for item_id, label, _ in items:
            self.ingested.append((item_id, label))
            yield IngestResult(item_id, "stored", "", False)

    def models(self):
        return [Model(name, 224, 1, True, True, "", (), "sha256:x") for name in ("lite0", "lite1")]

    def evaluate(self, dataset, **options):
        self.evaluated = options
        yield EvaluationProgress("evaluating", 1, 1, True, ())


def image(path: pathlib.Path) -> pathlib.Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(SAMPLE, path)
    return path


def ingest(folder, gateway: Gateway, *flags) -> int:
    return cli.cmd_ingest(parser().parse_args(["ingest", str(folder), "--dataset", "d", *flags]), gateway)


# ---- ingesting a folder or manifest ----------------------------------------------------------

@pytest.mark.parametrize("names", [("coat/zz.jpg", "coat/zz.png"), ("x.png", "x.PNG")])
def test_ingest_refuses_two_files_that_would_get_one_id(names, tmp_path, capsys):
    """Both became one id and the second silently replaced the first (data loss, exit 0)."""
    for name in names:
        image(tmp_path / name)
    assert main(["--gateway", UNREACHABLE, "ingest", str(tmp_path), "--dataset", "d"]) == 2  # before any call
    err = capsys.readouterr().err
    assert all(str(tmp_path / name) in err for name in names) and "would both be item" in err
    assert len(err.strip().splitlines()) == 1


def test_ingest_into_a_dataset_another_ingest_just_created(tmp_path):
    """Two parallel ingests into a new dataset: the one whose create lost the race failed (exit 1)."""
    image(tmp_path / "bag" / "a.png")
    gateway = Gateway(exists=False, created_meanwhile=True)
    assert ingest(tmp_path, gateway) == 0
    assert gateway.ingested == [("bag/a", "bag")]


def test_ingest_skips_entries_that_are_not_files(tmp_path):
    """A broken link or a folder named like an image aborted the whole ingest."""
    image(tmp_path / "bag" / "a.png")
    os.symlink(tmp_path / "nowhere.png", tmp_path / "bag" / "broken.png")
    (tmp_path / "bag" / "folder.png").mkdir()
    (tmp_path / "coat").mkdir()
    os.symlink(tmp_path / "bag" / "a.png", tmp_path / "coat" / "link.png")
    gateway = Gateway()
    assert ingest(tmp_path, gateway) == 0
    assert gateway.ingested == [("bag/a", "bag"), ("coat/link", "coat")]  # a link to a file is read


def test_a_file_that_cannot_be_read_is_a_failed_item(tmp_path, monkeypatch, capsys):
    """An unreadable file aborted the whole ingest; now the rest is ingested and it is a failed item."""
    image(tmp_path / "bag" / "a.png")
    locked = image(tmp_path / "bag" / "locked.png")
    read_bytes = pathlib.Path.read_bytes

    def unreadable(path):  # chmod 0 means nothing to root, who may run the tests
        if path == locked:
            raise PermissionError(13, "Permission denied", str(path))
        return read_bytes(path)

    monkeypatch.setattr(pathlib.Path, "read_bytes", unreadable)
    gateway = Gateway()
    assert ingest(tmp_path, gateway, "--json") == 1  # failed items: exit 1
    out, err = capsys.readouterr()
    assert json.loads(out) == {"dataset": "d", "stored": 1, "replaced": 0, "failed": 1}
    assert gateway.ingested == [("bag/a", "bag")]
    assert f"bag/locked: cannot read {locked} (Permission denied)" in err


def test_ingest_skips_hidden_files_and_folders(tmp_path):
    for name in (".git/obj.png", "coat/.hidden.png", "coat/._x.png", ".thumbs/coat/y.png", "coat/a.png"):
        image(tmp_path / name)
    gateway = Gateway()
    assert ingest(tmp_path, gateway) == 0
    assert gateway.ingested == [("coat/a", "coat")]


def test_a_csv_manifest_from_excel(tmp_path):
    """Excel writes a BOM and users pad cells with spaces: the BOM made the header a missing file
    and ` coat` a class of its own."""
    image(tmp_path / "img" / "a.png")
    image(tmp_path / "img" / "b.png")
    (tmp_path / "list.csv").write_bytes("\ufeffpath,label\r\nimg/a.png, coat\r\n img/b.png ,coat \r\n,\r\n"
                                        .encode("utf-8"))
    assert [(i, label) for i, label, _ in read_items(tmp_path / "list.csv")] == [("img/a", "coat"), ("img/b", "coat")]


def test_a_csv_manifest_with_absolute_paths(tmp_path, capsys):
    """An absolute path became the id (`/tmp/.../img/a`); now it is relative to the manifest's
    folder, and a file outside that folder is refused naming the row."""
    inside = image(tmp_path / "set" / "img" / "a.png")
    (tmp_path / "set" / "list.csv").write_text(f"{inside},coat\n")
    assert [(i, label) for i, label, _ in read_items(tmp_path / "set" / "list.csv")] == [("img/a", "coat")]
    outside = image(tmp_path / "elsewhere" / "b.png")
    (tmp_path / "set" / "bad.csv").write_text(f"img/a.png,coat\n{outside},coat\n")
    assert main(["--gateway", UNREACHABLE, "ingest", str(tmp_path / "set" / "bad.csv"), "--dataset", "d"]) == 2
    err = capsys.readouterr().err
    assert "bad.csv line 2" in err and str(outside) in err and "outside the manifest's folder" in err


def test_a_csv_manifest_naming_one_file_twice(tmp_path, capsys):
    image(tmp_path / "img" / "a.png")
    image(tmp_path / "img" / "a.jpg")
    (tmp_path / "list.csv").write_text("img/a.png,coat\nimg/a.jpg,bag\n")
    assert main(["--gateway", UNREACHABLE, "ingest", str(tmp_path / "list.csv"), "--dataset", "d"]) == 2
    assert "would both be item 'img/a'" in capsys.readouterr().err


# ---- addresses and ports ---------------------------------------------------------------------

@pytest.mark.parametrize("port", ["70000", "-5"])
def test_up_refuses_a_port_out_of_range(port, tmp_path, capsys):
    """OverflowError traceback, exit 1."""
    assert main(["up", "--data-dir", str(tmp_path), "--web-port", "0", "--port", port]) == 2
    err = capsys.readouterr().err
    assert f"--port must be 0..65535, got {port}" in err and "Traceback" not in err
    assert not (tmp_path / "index").exists()


@pytest.mark.parametrize(("argv", "said"), [
    (["--gateway", "not an address", "datasets"], "is not host:port"),
    (["--gateway", "127.0.0.1:99999", "datasets"], "out of range"),  # wrapped to port 34463
    (["health", "127.0.0.1:99999"], "out of range")])
def test_a_malformed_address_is_bad_usage(argv, said, capsys):
    assert main(argv) == 2
    assert said in capsys.readouterr().err


# ---- inspect ---------------------------------------------------------------------------------

def test_inspect_an_item_needs_its_dataset(tmp_path, capsys):
    """It failed at the gateway with "invalid dataset name ''" (exit 1)."""
    assert main(["--gateway", UNREACHABLE, "inspect", "--id", "bag/x", "--layer", "l", "--out", str(tmp_path)]) == 2
    assert "--id needs --dataset" in capsys.readouterr().err


def test_inspect_out_must_be_a_folder(tmp_path, capsys):
    """FileExistsError, exit 1, after the gateway had done the work."""
    (tmp_path / "maps").write_text("a file")
    assert main(["--gateway", UNREACHABLE, "inspect", "--dataset", "d", "--id", "bag/x", "--layer", "l",
                 "--out", str(tmp_path / "maps")]) == 2
    assert f"--out {tmp_path / 'maps'}: is a file, not a folder" in capsys.readouterr().err


# ---- minkowski needs p -----------------------------------------------------------------------

@pytest.mark.parametrize("argv", [["search", "--dataset", "d", "--id", "x", "--metric", "minkowski"],
                                  ["index", "--dataset", "d", "--metric", "minkowski"],
                                  ["evaluate", "--dataset", "d", "--metrics", "cosine", "minkowski"]])
def test_minkowski_without_p_is_bad_usage(argv, capsys):
    """The CLI sent p = 2 where the gateway refuses an unset p rather than assume 2."""
    assert main(["--gateway", UNREACHABLE, *argv]) == 2
    assert "minkowski needs --p" in capsys.readouterr().err


def test_minkowski_p_reaches_the_gateway():
    args = parser().parse_args(["search", "--dataset", "d", "--id", "x", "--metric", "minkowski", "--p", "3"])
    assert cli.configuration(args).minkowski_p == 3
    assert cli.configuration(parser().parse_args(["search", "--dataset", "d", "--id", "x"])).metric == "cosine"
    gateway = Gateway()
    args = parser().parse_args(["evaluate", "--dataset", "d", "--metrics", "cosine", "minkowski", "--p", "3"])
    assert cli.cmd_evaluate(args, gateway) == 0  # every available model, each metric, minkowski at p = 3
    assert gateway.evaluated["configurations"] == [
        Configuration(model, metric=metric, minkowski_p=3.0)
        for model in ("lite0", "lite1") for metric in ("cosine", "minkowski")]


# ---- --json errors ---------------------------------------------------------------------------

@pytest.mark.parametrize(("argv", "status", "code", "reason"), [
    (["--gateway", UNREACHABLE, "datasets"], 3, "UNAVAILABLE", "GATEWAY_UNAVAILABLE"),
    (["ingest", "/no/such/folder", "--dataset", "d"], 2, "INVALID_ARGUMENT", "USAGE"),
    (["health", UNREACHABLE, "--timeout", "0.5"], 3, "UNAVAILABLE", "UNAVAILABLE"),
])
def test_json_errors_are_json_on_stdout(argv, status, code, reason, capsys):
    """Under --json a failure printed nothing on stdout: a script had to parse stderr."""
    assert main(["--json", *argv]) == status
    out, err = capsys.readouterr()
    error = json.loads(out)["error"]
    assert (error["code"], error["reason"]) == (code, reason) and isinstance(error["metadata"], dict)
    assert error["message"] in err and len(err.strip().splitlines()) == 1


# ---- the Python client -----------------------------------------------------------------------

class StoreAll(gateway_pb2_grpc.GatewayServiceServicer):
    def Ingest(self, request_iterator, context):
        for request in request_iterator:
            for item in request.items:
                yield pb.IngestResponse(id=item.id, status=pb.INGEST_STATUS_STORED)


@pytest.fixture
def gateway_address():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    gateway_pb2_grpc.add_GatewayServiceServicer_to_server(StoreAll(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    yield f"127.0.0.1:{port}"
    server.stop(0)


def test_client_ingest_raises_the_callers_own_exception(gateway_address):
    """It became ConvsearchError INTERNAL "Exception iterating requests!"."""
    def items():
        for n in range(3):
            yield f"i{n}", "bag", b"png"
        raise FileNotFoundError("gone.png")

    stored = []
    with Client(gateway_address) as client, pytest.raises(FileNotFoundError, match="gone.png"):
        for result in client.ingest("d", items(), batch=2):
            stored.append(result.id)
    assert stored == ["i0", "i1", "i2"]  # what came before was sent, the partial batch too


REFUSED = {
    "image and item_id": (lambda c: c.search("d", image=b"png", item_id="a"),
                          "give image or item_id, not both", "QUERY_AMBIGUOUS"),
    "k beyond int32": (lambda c: c.search("d", item_id="a", k=2**31),
                       "k = 2147483648 is out of range; use 1 to 1000", "K_OUT_OF_RANGE"),
    "negative k": (lambda c: c.search("d", item_id="a", k=-1), "k = -1 is out of range", "K_OUT_OF_RANGE"),
    "evaluate k": (lambda c: list(c.evaluate("d", k=2**32)), "k = 4294967296 is out of range", "K_OUT_OF_RANGE"),
    "negative thumbnail": (lambda c: c.image("d", "a", thumbnail_size=-5),
                           "thumbnail_size = -5 is out of range; use 0 for the original",
                           "THUMBNAIL_SIZE_OUT_OF_RANGE"),
    "projection method": (lambda c: c.project("d", method="tsne"),
                          "unknown projection method 'tsne'; use pca or umap", "PROJECTION_METHOD_UNKNOWN"),
}


@pytest.mark.parametrize("case", REFUSED)
def test_client_refuses_what_the_gateway_would_or_the_message_cannot_carry(case):
    """Both queries: the image was silently ignored; a negative thumbnail_size returned the
    original; k beyond int32 and an unknown method raised plain ValueError."""
    call, message, reason = REFUSED[case]
    with Client(UNREACHABLE) as client, pytest.raises(InvalidArgument, match=message) as refused:
        call(client)  # refused before any call: the gateway is not there
    assert refused.value.reason == reason


def test_client_k_0_means_15():
    """gateway.proto: "Results wanted; 0 means 15", so k = 0 goes to the gateway."""
    with Client(UNREACHABLE) as client, pytest.raises(Unavailable):
        client.search("d", item_id="a", k=0)


def test_an_api_key_sent_in_plaintext_to_another_machine_is_warned_about(recwarn):
    from convsearch.client import Client, PlaintextKeyWarning

    for address in ("127.0.0.1:50051", "localhost:1", "[::1]:50051", "dns:///localhost:50051"):
        Client(address, api_key="secret").close()
    Client("10.0.0.5:50051").close()  # no key, nothing to leak
    assert not [w for w in recwarn if issubclass(w.category, PlaintextKeyWarning)]
    for address in ("10.0.0.5:50051", "127.0.0.1:1,10.0.0.6:1", "dns:///gateway:50051"):
        with pytest.warns(PlaintextKeyWarning, match="in plaintext"):
            Client(address, api_key="secret").close()
