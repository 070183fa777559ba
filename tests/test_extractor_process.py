"""The `convsearch-extractor` command as an operator runs it: flags, health, SIGTERM."""

import os
import signal
import subprocess
import sys
import time

import grpc
import pytest

from convsearch.channels import create_channel
from convsearch.extractor.v1 import extractor_pb2 as pb
from convsearch.extractor.v1 import extractor_pb2_grpc
from convsearch.processes import start_service, stop_service
from convsearch_extractor.server import SERVICE_NAME

EXTRACTOR = os.path.join(os.path.dirname(sys.executable), "convsearch-extractor")


def test_serves_then_shuts_down_cleanly_on_sigterm(chelsea_jpeg):
    process, address = start_service("convsearch-extractor", "--metrics-port", "-1", service=SERVICE_NAME)
    channel = create_channel(address)
    reply = extractor_pb2_grpc.ExtractorServiceStub(channel).Embed(
        pb.EmbedRequest(images=[chelsea_jpeg]), timeout=60)
    assert reply.pretrained and reply.layers[0].layer == "_conv_head"
    channel.close()
    log = stop_service(process)
    assert process.returncode == 0, log
    assert "SERVING" in log and "received SIGTERM" in log and "stopped" in log


def test_a_decode_process_that_dies_stops_the_service_for_its_supervisor_to_restart(chelsea_jpeg):
    """The pool of decode processes cannot be used once one has died (killed by the OOM killer):
    every request then failed with INTERNAL, for good, while health said SERVING."""
    process, address = start_service("convsearch-extractor", "--metrics-port", "-1", "--decode-processes", "2",
                                      service=SERVICE_NAME)
    # Without the project's retry policy: a retry of the UNAVAILABLE answer would reach the
    # service after it exited, and report the refused connection instead of the answer.
    channel = grpc.insecure_channel(address)
    try:
        stub = extractor_pb2_grpc.ExtractorServiceStub(channel)
        request = pb.EmbedRequest(config=pb.EmbedConfig(model="pixels", layers=["8x8"]), images=[chelsea_jpeg])
        stub.Embed(request, timeout=60)
        children = subprocess.run(["pgrep", "-P", str(process.pid)], capture_output=True, text=True).stdout.split()
        os.kill(int(children[0]), signal.SIGKILL)
        with pytest.raises(grpc.RpcError) as failed:
            for _ in range(20):  # the pool learns of the death when it next hands out work
                stub.Embed(request, timeout=60)
                time.sleep(0.2)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "a decode process died" in failed.value.details()
        assert process.wait(timeout=60) != 0  # ended, as a failure, for its supervisor to start it again
        log = stop_service(process)
        assert "can no longer serve" in log
    finally:
        channel.close()
        if process.poll() is None:
            stop_service(process)


def test_bad_flags_fail_fast_with_a_clear_message():
    for args, words in ((["--max-batch", "0"], "max_batch must be positive"),
                        (["--device", "tpu"], "use auto, cpu, cuda or cuda:N"),
                        (["--port", "nope"], "invalid int value")):
        result = subprocess.run([EXTRACTOR, *args], capture_output=True, text=True, timeout=60)
        assert result.returncode == 2 and words in result.stderr, result.stderr


def test_bad_environment_variable_fails_fast():
    result = subprocess.run([EXTRACTOR], capture_output=True, text=True, timeout=60,
                            env={**os.environ, "CONVSEARCH_EXTRACTOR_MAX_BATCH": "many"})
    assert result.returncode == 2 and "CONVSEARCH_EXTRACTOR_MAX_BATCH" in result.stderr


def test_port_in_use_fails_fast():
    process, address = start_service("convsearch-extractor", "--metrics-port", "-1", service=SERVICE_NAME)
    try:
        port = address.rsplit(":", 1)[1]
        result = subprocess.run([EXTRACTOR, "--host", "127.0.0.1", "--port", port, "--metrics-port", "-1"],
                                capture_output=True, text=True, timeout=60)
        assert result.returncode != 0 and f"cannot listen on 127.0.0.1:{port}" in result.stderr
    finally:
        stop_service(process)
