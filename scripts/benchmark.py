"""Measure proxy throughput on loopback: bare mitmdump against mitmdump with the mitmkeys addon.

The script starts scripts/demo_upstream.py, then one mitmdump at a time on 127.0.0.1, and drives
keep-alive clients (one thread and one connection each) through the proxy for a fixed time.
The addon run sends a valid virtual key; the bare run sends the upstream credential itself.
A run without a proxy shows what the upstream and the clients manage alone. Every process
binds to 127.0.0.1 and is stopped at the end. The numbers depend on the machine and on the
Python client threads, which share one interpreter; compare runs from the same machine only.
"""

import argparse
import http.client
import json
import logging
import os
import pathlib
import platform
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from typing import NamedTuple

REPOSITORY_ROOT = pathlib.Path(__file__).resolve().parent.parent
if str(REPOSITORY_ROOT) not in sys.path:
    sys.path.insert(0, str(REPOSITORY_ROOT))

from addon import timeutil  # noqa: E402
from addon.store import Store  # noqa: E402

log = logging.getLogger("benchmark")

LOOPBACK = "127.0.0.1"
DEMO_UPSTREAM = REPOSITORY_ROOT / "scripts" / "demo_upstream.py"
ADDON_SCRIPT = REPOSITORY_ROOT / "addon" / "keys.py"
STARTUP_TIMEOUT_SECONDS = 30.0
STOP_TIMEOUT_SECONDS = 15.0
REQUEST_TIMEOUT_SECONDS = 10.0
MAX_SECONDS = 300.0
MAX_CLIENTS = 64
CHAT_BODY = json.dumps({"model": "demo-model", "messages": [{"role": "user", "content": "Say hello."}]}).encode()


class RunResult(NamedTuple):
    label: str
    ok: int
    failed: int
    seconds: float
    failures: dict[str, int]  # failure reason, such as "status 503", and how often it happened

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0


def free_port() -> int:
    """Return a loopback port that is free now, though another process could still take it first."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((LOOPBACK, 0))
        return probe.getsockname()[1]


def wait_for_port(port: int, process: subprocess.Popen, name: str) -> None:
    """Wait until `port` accepts connections, and raise RuntimeError when `process` exits or time runs out."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{name} exited with status {process.returncode} before listening")
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{name} did not listen on {LOOPBACK}:{port} within {STARTUP_TIMEOUT_SECONDS:.0f} s")


def stop(process: subprocess.Popen, name: str) -> None:
    """Stop a child process: SIGINT for a clean shutdown, then SIGKILL if it does not exit in time."""
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGINT)
    try:
        process.wait(STOP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        log.warning("%s (pid %d) did not stop within %.0f s, so it is killed", name, process.pid, STOP_TIMEOUT_SECONDS)
        process.kill()
        process.wait()


class Target(NamedTuple):
    """Port and request of one benchmark run."""

    connect_port: int
    method: str
    url: str  # absolute-form through a proxy, origin-form without one
    headers: dict[str, str]
    body: bytes | None


def drive_clients(
    target: Target, clients: int, warmup: float, seconds: float, max_requests: int,
) -> tuple[int, int, float, dict[str, int]]:
    """Run `clients` keep-alive connections for warmup + seconds, and count requests after the warm-up.

    Returns (ok, failed, measured seconds, failure reasons). A response other than 200 counts as
    failed, and so does a connection error, after which the client opens a new connection. Each
    client stops after max_requests / clients counted requests, so the run also ends when that
    budget is spent.
    """
    budget = max(1, max_requests // clients)
    start = time.monotonic()
    measure_from = start + warmup
    deadline = measure_from + seconds
    counts = [[0, 0] for _ in range(clients)]
    finished_at = [deadline] * clients
    failures: dict[str, int] = {}
    failures_lock = threading.Lock()

    def client(index: int) -> None:
        connection = http.client.HTTPConnection(LOOPBACK, target.connect_port, timeout=REQUEST_TIMEOUT_SECONDS)
        tally = counts[index]
        while True:
            now = time.monotonic()
            if now >= deadline or tally[0] + tally[1] >= budget:
                finished_at[index] = min(now, deadline)
                break
            reason = None
            try:
                connection.request(target.method, target.url, body=target.body, headers=target.headers)
                response = connection.getresponse()
                response.read()
                if response.status != 200:
                    reason = f"status {response.status}"
            except (OSError, http.client.HTTPException) as error:
                connection.close()
                reason = type(error).__name__
            if time.monotonic() < measure_from:
                continue
            if reason is None:
                tally[0] += 1
            else:
                tally[1] += 1
                with failures_lock:
                    failures[reason] = failures.get(reason, 0) + 1
        connection.close()

    threads = [threading.Thread(target=client, args=(index,), daemon=True) for index in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(warmup + seconds + REQUEST_TIMEOUT_SECONDS + 5)
    measured = max(finished_at) - measure_from
    return sum(tally[0] for tally in counts), sum(tally[1] for tally in counts), measured, failures


def start_upstream(credential: str, log_file) -> tuple[subprocess.Popen, int]:
    # The demo server prints its port on the first line of stdout.
    process = subprocess.Popen(
        [sys.executable, str(DEMO_UPSTREAM), "--port", "0", "--credential", credential],
        stdout=subprocess.PIPE, stderr=log_file, text=True,
    )
    line = process.stdout.readline()
    if not line.startswith("demo upstream listening on"):
        stop(process, "demo upstream")
        raise RuntimeError(f"demo upstream did not start: its first output line was {line!r}")
    port = int(line.rsplit(":", 1)[1])
    return process, port


def start_mitmdump(mitmdump: str, port: int, folder: pathlib.Path, extra: list[str], log_file) -> subprocess.Popen:
    command = [
        mitmdump, "--listen-host", LOOPBACK, "--listen-port", str(port),
        # A private confdir keeps the CA files that mitmdump creates out of ~/.mitmproxy.
        "--set", f"confdir={folder / 'confdir'}",
        "--set", "flow_detail=0", "--set", "termlog_verbosity=warn",
        *extra,
    ]
    process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT, cwd=folder)
    try:
        wait_for_port(port, process, "mitmdump")
    except RuntimeError:
        stop(process, "mitmdump")
        raise
    return process


def probe(target: Target) -> int:
    """Send one request and return its status, so a misconfigured run fails before it is measured."""
    connection = http.client.HTTPConnection(LOOPBACK, target.connect_port, timeout=REQUEST_TIMEOUT_SECONDS)
    try:
        connection.request(target.method, target.url, body=target.body, headers=target.headers)
        response = connection.getresponse()
        response.read()
        return response.status
    finally:
        connection.close()


def create_key(database: pathlib.Path, upstream_port: int, credential: str, lifetime: float) -> str:
    """Create the service and one virtual key without limits in a new store, and return the key's secret."""
    store = Store(str(database))
    store.open()
    try:
        store.create_service("bench", f"http://{LOOPBACK}:{upstream_port}", credential, "Authorization")
        _, secret = store.create_key(
            key_id="bench", target="bench", scope="write", expires_at=timeutil.now() + lifetime,
            rate_limit=None, one_shot=False, source="cli",
        )
    finally:
        store.close()
    return secret


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Measure requests per second through bare mitmdump and through mitmdump -s addon/keys.py, "
            "with keep-alive clients against scripts/demo_upstream.py, all on 127.0.0.1."
        ),
    )

    parser.add_argument("--seconds", type=float, default=10.0,
                        help=f"measured seconds per run, at most {MAX_SECONDS:.0f} (default: 10)")
    parser.add_argument("--warmup", type=float, default=1.0,
                        help="seconds per run before counting starts (default: 1)")
    parser.add_argument("--clients", type=int, default=4,
                        help=f"concurrent keep-alive clients, at most {MAX_CLIENTS} (default: 4)")
    parser.add_argument("--max-requests", type=int, default=1_000_000,
                        help="upper bound on requests per run; a run ends early when it is reached (default: 1000000)")
    parser.add_argument("--endpoint", choices=("models", "chat"), default="models",
                        help="models: GET /v1/models; chat: POST /v1/chat/completions without streaming (default: models)")
    parser.add_argument("--mitmdump", default=str(pathlib.Path(sys.executable).with_name("mitmdump")),
                        help="mitmdump executable (default: the one next to this Python)")
    parser.add_argument("--skip-direct", action="store_true",
                        help="skip the run without a proxy")

    arguments = parser.parse_args(argv)
    if not 0 < arguments.seconds <= MAX_SECONDS:
        parser.error(f"invalid --seconds {arguments.seconds}: expected more than 0 and at most {MAX_SECONDS:.0f}")
    if not 0 <= arguments.warmup <= 60:
        parser.error(f"invalid --warmup {arguments.warmup}: expected 0 to 60 seconds")
    if not 1 <= arguments.clients <= MAX_CLIENTS:
        parser.error(f"invalid --clients {arguments.clients}: expected 1 to {MAX_CLIENTS}")
    if arguments.max_requests < arguments.clients:
        parser.error(f"invalid --max-requests {arguments.max_requests}: expected at least --clients")
    return arguments


def request_for(endpoint: str) -> tuple[str, str, bytes | None, dict[str, str]]:
    """Return method, path, body and content headers of the request that each run repeats."""
    if endpoint == "models":
        return "GET", "/v1/models", None, {}
    return "POST", "/v1/chat/completions", CHAT_BODY, {"Content-Type": "application/json"}


def run_benchmark(arguments: argparse.Namespace, folder: pathlib.Path, logs) -> list[RunResult]:
    """Start the upstream, then measure the direct run (unless skipped), bare mitmdump and the addon."""
    credential = "sk-bench-" + secrets.token_urlsafe(16)
    method, path, body, content_headers = request_for(arguments.endpoint)
    run_seconds = arguments.warmup + arguments.seconds

    def measure(label: str, target: Target) -> RunResult:
        log.info("run: %s, %.0f s", label, run_seconds)
        return RunResult(label, *drive_clients(
            target, arguments.clients, arguments.warmup, arguments.seconds, arguments.max_requests))

    results: list[RunResult] = []
    upstream, upstream_port = start_upstream(credential, logs)
    try:
        secret = create_key(folder / "keys.db", upstream_port, credential, lifetime=run_seconds * 3 + 600)
        if not arguments.skip_direct:
            headers = {"Authorization": f"Bearer {credential}", **content_headers}
            results.append(measure("direct (no proxy)", Target(upstream_port, method, path, headers, body)))

        # The bare proxy forwards the client's own credential; the addon swaps the virtual key for it.
        runs = [
            ("mitmdump", [], {"Authorization": f"Bearer {credential}"}),
            ("mitmdump -s addon/keys.py", [
                "-s", str(ADDON_SCRIPT), "--set", f"keys_db={folder / 'keys.db'}", "--set", "keys_api_port=0",
            ], {"X-Virtual-Key": secret}),
        ]
        upstream_url = f"http://{LOOPBACK}:{upstream_port}{path}"
        for label, extra_arguments, headers in runs:
            port = free_port()
            proxy = start_mitmdump(arguments.mitmdump, port, folder, extra_arguments, logs)
            try:
                target = Target(port, method, upstream_url, {**headers, **content_headers}, body)
                status = probe(target)
                if status != 200:
                    raise RuntimeError(f"{label}: a probe request got status {status} instead of 200")
                results.append(measure(label, target))
            finally:
                stop(proxy, "mitmdump")
    finally:
        stop(upstream, "demo upstream")
    return results


def print_report(arguments: argparse.Namespace, results: list[RunResult]) -> None:
    method, path, _, _ = request_for(arguments.endpoint)
    print()
    print(f"{method} {path}, {arguments.clients} keep-alive clients, {arguments.seconds:g} s measured per run "
          f"after {arguments.warmup:g} s warm-up, all on loopback")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
          f"Python {platform.python_version()}")
    for result in results:
        print(f"  {result.label:<28} {result.rate:10.1f} requests/s  ({result.ok} ok, {result.failed} failed)")
        if result.failures:
            reasons = ", ".join(f"{reason}: {count}" for reason, count in sorted(result.failures.items()))
            print(f"  {'':<28} failures: {reasons}")

    bare, addon = results[-2], results[-1]
    if bare.rate > 0:
        print(f"  addon / bare: {addon.rate / bare.rate:.2f}")


def main(argv: list[str] | None = None) -> int:
    arguments = parse_arguments(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    if not os.access(arguments.mitmdump, os.X_OK):
        log.error("mitmdump not found at %s. Pass --mitmdump PATH", arguments.mitmdump)
        return 2

    with tempfile.TemporaryDirectory(prefix="mitmkeys-bench-") as folder_name:
        folder = pathlib.Path(folder_name)
        with open(folder / "processes.log", "w+") as logs:
            try:
                results = run_benchmark(arguments, folder, logs)
            except RuntimeError as error:
                log.error("%s", error)
                logs.seek(0)
                sys.stderr.write("last output of the upstream and mitmdump:\n" + logs.read()[-4000:])
                return 1

    print_report(arguments, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
