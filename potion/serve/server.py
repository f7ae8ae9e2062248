"""Run the server: load the model, bind the address, serve until Ctrl-C or SIGTERM, then stop cleanly.

It binds 127.0.0.1 unless told otherwise, and warns when another machine could reach it. On Ctrl-C or SIGTERM
it stops taking connections, ends the generations in progress (a stream gets an error event saying the
server is shutting down), stops the model thread and exits 0; a second Ctrl-C exits at once.
"""

from __future__ import annotations

import ipaddress
import os
import signal
import socket
import sys
import warnings

import uvicorn

from potion.errors import PotionError
from potion.hardware import physical_cores, set_threads
from potion.serve.app import build_app
from potion.serve.served import ServedModel
from potion.serve.worker import ModelWorker

GRACE_SECONDS = 5  # for requests to finish after a stop signal before they are cancelled


def listen(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free port), or one PotionError naming the flag to change."""
    if not 0 <= port <= 65535:
        raise PotionError(f"port must be between 0 and 65535, got {port}", setting="port")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
        )[0]
    except (socket.gaierror, UnicodeError) as e:
        raise PotionError(f"host {host!r} is not an address of this machine ({e})", setting="host") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise PotionError(f"cannot listen on {host} port {port} ({e.strerror}); choose another port", "port") from None
    return sock


def ip_of(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A bound socket's address, without an IPv6 scope (fe80::1%eth0)."""
    return ipaddress.ip_address(address.split("%")[0])


def reach_warning(address: str, api_key: str | None) -> str | None:
    """A warning when the bound address is reachable from other machines."""
    ip = ip_of(address)
    if ip.is_loopback:
        return None
    where = "every network interface of this machine" if ip.is_unspecified else f"{address}"
    advice = "" if api_key else "; pass --api-key KEY to require a key"
    return f"listening on {where}: other machines that can reach it can use the model and its API{advice}"


def url(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    ip = ip_of(host)
    if ip.is_unspecified:  # every interface: this machine reaches itself on loopback
        ip = ipaddress.ip_address("127.0.0.1" if ip.version == 4 else "::1")
    return f"http://{ip}:{port}" if ip.version == 4 else f"http://[{ip}]:{port}"


def serving_threads() -> int:
    """The model's torch threads: OMP_NUM_THREADS where set, else one per physical core but one, which is left to
    the HTTP side. On two cores, one thread served a tiny model's tokens 3x faster than two
    (`benchmarks/serve_load.py --threads 1` against `--threads 2`): two fought the event loop for the cores."""
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return max(1, physical_cores() - 1)


def serve(model: str | None = None, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None) -> int:
    sock = listen(host, port)  # first: a port in use is said at once, not after loading a large model
    set_threads(serving_threads())
    served = ServedModel(model)
    warning = reach_warning(sock.getsockname()[0], api_key)
    if warning:
        warnings.warn(warning)
    address = url(sock)
    parameters = served.run.model.num_parameters()

    def announce() -> None:
        print(
            f"potion serve: {served.id} ({parameters:,} parameters) at {address}/ (the live page; the OpenAI API "
            f"under {address}/v1); Ctrl-C to stop",
            file=sys.stderr,
            flush=True,
        )

    worker = ModelWorker()
    local = ip_of(sock.getsockname()[0]).is_loopback
    app = build_app(served, api_key, worker, on_start=announce, local_only=local)
    config = uvicorn.Config(
        app, log_level="warning", access_log=False, lifespan="on", timeout_graceful_shutdown=GRACE_SECONDS
    )
    server = StoppingServer(config, worker)
    with signals_handled():
        server.run(sockets=[sock])
    stopped_by = f" ({signal.Signals(server.signals[-1]).name})" if server.signals else ""
    print(f"potion serve: stopped{stopped_by}", file=sys.stderr, flush=True)
    return 0


class StoppingServer(uvicorn.Server):
    """uvicorn's Server, which on a stop signal also ends the generations in progress at once (a long stream
    would otherwise hold the shutdown for the whole grace period)."""

    def __init__(self, config: uvicorn.Config, worker: ModelWorker):
        super().__init__(config)
        self.worker, self.signals = worker, []

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        self.signals.append(sig)
        self.worker.stop(wait=False)


class signals_handled:
    """uvicorn raises the stop signal again once it has shut down; here that lands on a handler that does
    nothing, so the shutdown it already did is the end (exit code 0), not a KeyboardInterrupt or a kill."""

    def __enter__(self):
        self.previous = {s: signal.signal(s, lambda *_: None) for s in (signal.SIGINT, signal.SIGTERM)}

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)
