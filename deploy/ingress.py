"""The OpenAI HTTP front end as several processes on one address (pre-fork, as gunicorn does).

One ingress process is one Python event loop: parsing, JSON and server-sent events for every
stream run on one core. ``IngressReplicas`` binds the listening socket once (a port in use fails
here, naming it) and starts ``replicas`` processes that inherit it; each joins Ray, finds the
cluster's router by name and accepts connections on the shared socket with its own uvicorn loop
and its own ``Client`` (so one long poll to the router per replica). Request metrics run in
Prometheus' multiprocess mode: any replica's ``/metrics`` sums every replica's (deploy/openai_metrics.py).
A replica that dies after it started serving is restarted; the others serve meanwhile.
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

READY_TIMEOUT_S = 120.0
STOP_TIMEOUT_S = 10.0
MAX_BACKOFF_S = 30.0


class IngressError(RuntimeError):
    """The ingress could not start: the address is taken, or a replica died before serving."""


class _Replica:
    """One ingress process and when it may next be restarted."""

    def __init__(self, index: int) -> None:
        self.index, self.process, self.failures, self.not_before = index, None, 0, 0.0


class IngressReplicas:
    """``replicas`` HTTP ingress processes in front of the running cluster ``cluster_name``."""

    def __init__(self, cluster_name: str, names: list[str], address: tuple[str, int], replicas: int,
                 api_key: str | None = None, ray_address: str | None = None) -> None:
        if replicas < 1:
            raise ValueError(f"http replicas must be at least 1, got {replicas}")
        self.cluster_name, self.names, self.address, self.api_key = cluster_name, names, address, api_key
        self.ray_address = ray_address
        self.replicas = [_Replica(i) for i in range(replicas)]
        self.socket: socket.socket | None = None
        self.state_dir = Path(tempfile.mkdtemp(prefix="tandem-ingress-"))
        (self.state_dir / "metrics").mkdir()
        (self.state_dir / "ready").mkdir()

    @property
    def pids(self) -> list[int]:
        """The replicas' processes that are alive."""
        return [r.process.pid for r in self.replicas if r.process is not None and r.process.poll() is None]

    @property
    def serving(self) -> list[int]:
        """The live replicas' processes that accept connections."""
        return [r.process.pid for r in self.replicas
                if r.process is not None and r.process.poll() is None and self._ready(r)]

    def start(self, timeout_s: float = READY_TIMEOUT_S) -> None:
        """Bind the address and start every replica; return when each is serving. On failure
        (IngressError) nothing is left running."""
        try:
            self.socket = _listening_socket(*self.address)
        except IngressError:
            self.close()
            raise
        for replica in self.replicas:
            self._spawn(replica)
        deadline = time.monotonic() + timeout_s
        while not all(self._ready(r) for r in self.replicas):
            for replica in self.replicas:
                if replica.process.poll() is not None:
                    self.close()
                    raise IngressError(f"HTTP ingress replica {replica.index} exited with code "
                                       f"{replica.process.returncode} before serving (its output is above)")
            if time.monotonic() > deadline:
                self.close()
                raise IngressError(f"HTTP ingress replicas not serving after {timeout_s:.0f} s")
            time.sleep(0.1)

    def watch(self, stop: threading.Event, interval_s: float = 0.5) -> None:
        """Restart replicas that die (with a growing pause if one keeps dying) until ``stop`` is set."""
        while not stop.wait(interval_s):
            for replica in self.replicas:
                self._restart_if_dead(replica)

    def close(self) -> None:
        """Stop every replica (SIGTERM, then SIGKILL after STOP_TIMEOUT_S) and remove their files."""
        live = [r.process for r in self.replicas if r.process is not None and r.process.poll() is None]
        for process in live:
            process.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for process in live:
            try:
                process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        if self.socket is not None:
            self.socket.close()
            self.socket = None
        shutil.rmtree(self.state_dir, ignore_errors=True)

    def _restart_if_dead(self, replica: _Replica) -> None:
        code = replica.process.poll()
        if code is None:
            if self._ready(replica):
                replica.failures = 0
            return
        now = time.monotonic()
        if now < replica.not_before:
            return
        replica.failures += 1
        replica.not_before = now + min(MAX_BACKOFF_S, 2.0 ** (replica.failures - 1))
        print(f"HTTP ingress replica {replica.index} (pid {replica.process.pid}) exited with code {code}; "
              f"restarting it", file=sys.stderr, flush=True)
        self._spawn(replica)

    def _ready(self, replica: _Replica) -> bool:
        return (self.state_dir / "ready" / str(replica.process.pid)).exists()

    def _spawn(self, replica: _Replica) -> None:
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=str(self.state_dir / "metrics"))
        if self.api_key is not None:
            env["TANDEM_API_KEY"] = self.api_key  # in the environment, not on the command line
        else:
            env.pop("TANDEM_API_KEY", None)
        fd = self.socket.fileno()
        command = [sys.executable, "-m", "tandem.deploy.ingress", self.cluster_name, "--fd", str(fd),
                   "--ray-address", self.ray_address or "", "--ready-dir", str(self.state_dir / "ready"),
                   "--names", *self.names]
        replica.process = subprocess.Popen(command, env=env, pass_fds=(fd,), start_new_session=True)


def _listening_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise IngressError(f"cannot serve HTTP on {host}:{port}: {exc.strerror}") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


def _serve_replica(args: argparse.Namespace) -> None:
    """A replica's life: join Ray, connect to the router, serve the inherited socket until told
    to stop (SIGTERM) or until the process that started it is gone."""
    from tandem.cluster.launcher import connect
    from tandem.deploy.openai_server import Served, http_server
    from tandem.deploy.ray_session import connect_ray

    sock = socket.socket(fileno=args.fd)
    connect_ray(args.ray_address or None, local_ok=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))  # stopped before serving: quietly (uvicorn's own later)
    client = connect(args.cluster)
    served = Served(client, args.names, client.limits()["max_tokens"], os.environ.get("TANDEM_API_KEY"))
    host, port = sock.getsockname()[:2]
    server = http_server(served, host, port)
    parent = os.getppid()

    def mark_ready_then_watch_parent() -> None:
        while not server.started and not server.should_exit:
            time.sleep(0.05)
        (Path(args.ready_dir) / str(os.getpid())).touch()
        while os.getppid() == parent and not server.should_exit:
            time.sleep(1.0)
        server.should_exit = True

    threading.Thread(target=mark_ready_then_watch_parent, daemon=True).start()
    server.run(sockets=[sock])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tandem.deploy.ingress",
                                     description="one HTTP ingress replica (started by `tandem serve`)")
    parser.add_argument("cluster")
    parser.add_argument("--fd", type=int, required=True, help="the inherited listening socket")
    parser.add_argument("--ray-address", default="")
    parser.add_argument("--ready-dir", required=True)
    parser.add_argument("--names", nargs="+", required=True)
    _serve_replica(parser.parse_args(argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())
