"""Running service processes (tests, benchmarks, local set-ups): free ports, start, wait, stop."""

import os
import socket
import subprocess
import sys

from convsearch.channels import create_channel, wait_until_serving


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_service(command: str, *args: str, service: str = "", timeout_s: float = 120.0, env=None):
    """Starts `command args` (an installed console script), waits until `service` is SERVING.

    Returns (process, address). The caller stops it with `stop_service`.
    """
    port = free_port()
    process = subprocess.Popen(
        [os.path.join(os.path.dirname(sys.executable), command), "--host", "127.0.0.1",
         "--port", str(port), *args],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env={**os.environ, **(env or {})})
    address = f"127.0.0.1:{port}"
    channel = create_channel(address)
    try:
        wait_until_serving(channel, service, timeout_s)
    except TimeoutError:
        process.kill()
        raise RuntimeError(f"{command} did not become healthy:\n{process.communicate()[0]}") from None
    finally:
        channel.close()
    return process, address


def stop_service(process: subprocess.Popen, timeout_s: float = 30.0) -> str:
    """SIGTERM, wait, return everything it logged."""
    process.terminate()
    output, _ = process.communicate(timeout=timeout_s)
    return output
