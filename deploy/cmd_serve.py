"""`tandem serve SPEC [--detach]`, `tandem status NAME`, `tandem drain NAME INSTANCE`,
`tandem shutdown NAME`."""
from __future__ import annotations

import argparse
import json
import os
import signal
import threading

from tandem.deploy.cli import CommandError


def register(subparsers: argparse._SubParsersAction) -> None:
    serve = subparsers.add_parser("serve", help="start the cluster a YAML spec describes")
    serve.add_argument("spec", help="cluster spec (YAML), e.g. deploy/specs/smollm2-cpu.yaml")
    serve.add_argument("--detach", action="store_true",
                       help="leave the cluster running (detached actors) and return")
    serve.add_argument("--address", help="Ray cluster address (default: $RAY_ADDRESS or a local one)")
    serve.add_argument("--http", metavar="[HOST:]PORT",
                       help="also serve the OpenAI API over HTTP (host default 127.0.0.1; "
                            "overrides the spec's http section)")
    serve.add_argument("--http-replicas", type=int, metavar="N",
                       help="HTTP ingress processes sharing the port (default: the spec's, else 1)")
    serve.add_argument("--api-key", default=os.environ.get("TANDEM_API_KEY"),
                       help="require this bearer token on HTTP requests (default: $TANDEM_API_KEY)")
    serve.set_defaults(func=_serve)

    status = subparsers.add_parser("status", help="instances and KV usage of a running cluster")
    status.add_argument("name")
    status.add_argument("--address")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=_status)

    drain = subparsers.add_parser("drain", help="move every request off a decode instance; it takes no new ones")
    drain.add_argument("name")
    drain.add_argument("instance", help="the decode instance, as `tandem status NAME` lists it")
    drain.add_argument("--timeout", type=float, default=120.0, help="seconds (default %(default)s)")
    drain.add_argument("--address")
    drain.set_defaults(func=_drain)

    stop = subparsers.add_parser("shutdown", help="stop a detached cluster")
    stop.add_argument("name")
    stop.add_argument("--address")
    stop.set_defaults(func=_shutdown)


def load_spec_or_fail(path: str):
    from tandem.cluster.spec import load_spec
    from tandem.cluster.spec_types import SpecError

    try:
        return load_spec(path)
    except SpecError as exc:
        raise CommandError(str(exc)) from exc


def plan_if_auto(spec):
    """An auto spec planned for the connected Ray cluster (plan printed in one line), or the spec
    itself when there is nothing to plan. CommandError, before any actor starts, if it cannot be."""
    from tandem.cluster.autoplace import summary
    from tandem.cluster.launcher import plan_on_ray
    from tandem.cluster.spec_types import SpecError

    if not spec.needs_planning:
        return spec
    try:
        planned = plan_on_ray(spec)
    except SpecError as exc:
        raise CommandError(str(exc)) from exc
    print(summary(spec.name, planned.result), flush=True)
    return planned.spec


def _serve(args: argparse.Namespace) -> int:
    from tandem.cluster.launcher import Cluster, LaunchError
    from tandem.cluster.spec_types import SpecError
    from tandem.deploy.ray_session import connect_ray

    spec = load_spec_or_fail(args.spec)  # fails before any actor starts
    address, replicas = _http_choice(args, spec)
    if address is not None and args.detach:
        raise CommandError("HTTP (--http or the spec's http section) serves in the foreground: drop --detach")
    connect_ray(args.address, local_ok=not args.detach)
    spec = plan_if_auto(spec)
    try:
        cluster = Cluster.from_spec(spec, detach=args.detach)
    except (LaunchError, SpecError) as exc:
        raise CommandError(str(exc)) from exc
    print(f"cluster {spec.name!r} is up: {', '.join(cluster.actors)}")
    if args.detach:
        print(f"connect with tandem.connect({spec.name!r}); stop with `tandem shutdown {spec.name}`")
        return 0
    print("serving; Ctrl-C stops it")
    _stop_on_sigterm()
    try:
        if address is not None:
            _serve_http(cluster, spec, address, replicas, args.api_key)
        else:
            threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        cluster.shutdown()
    return 0


def _stop_on_sigterm() -> None:
    """SIGTERM (a service manager, `kill`) stops the cluster as Ctrl-C does, not mid-air."""
    def interrupt(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, interrupt)


def _http_choice(args: argparse.Namespace, spec) -> tuple[tuple[str, int] | None, int]:
    """Where to serve HTTP and with how many ingress processes: the flags, else the spec's http
    section; (None, 1) for no HTTP."""
    from tandem.cluster.spec_check import MAX_HTTP_REPLICAS
    from tandem.deploy.openai_server import parse_address

    address = None
    if args.http:
        try:
            address = parse_address(args.http)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
    elif spec.http is not None:
        address = (spec.http.host, spec.http.port)
    replicas = args.http_replicas or (spec.http.replicas if spec.http is not None else 1)
    if args.http_replicas is not None and not 1 <= args.http_replicas <= MAX_HTTP_REPLICAS:
        raise CommandError(f"--http-replicas: must be 1 to {MAX_HTTP_REPLICAS}, got {args.http_replicas}")
    if args.http_replicas is not None and address is None:
        raise CommandError("--http-replicas needs --http [HOST:]PORT or an http section in the spec")
    return address, replicas


def _serve_http(cluster, spec, address: tuple[str, int], replicas: int, api_key: str | None) -> None:
    """The OpenAI API in front of ``cluster`` until Ctrl-C, in this process or in ``replicas``
    ingress processes; the model answers to the spec's name and, for a prepared model, its name."""
    names = [spec.name] + ([spec.model.name] if spec.model.name else [])
    host, port = address
    where = f"http://{host}:{port}/v1 (models: {', '.join(names)})"
    if replicas == 1:
        from tandem.deploy.openai_server import Served, http_server

        client = cluster.client()
        served = Served(client, names, client.limits()["max_tokens"], api_key)
        print(f"OpenAI API on {where}", flush=True)
        http_server(served, host, port).run()
        return
    import ray

    from tandem.deploy.ingress import IngressError, IngressReplicas

    ingress = IngressReplicas(spec.name, names, address, replicas, api_key,
                              ray.get_runtime_context().gcs_address)
    try:
        ingress.start()
        print(f"OpenAI API on {where}, {replicas} ingress processes", flush=True)
        ingress.watch(threading.Event())
    except IngressError as exc:
        raise CommandError(str(exc)) from exc
    finally:
        ingress.close()  # before the cluster goes: no replica outlives it


def _status(args: argparse.Namespace) -> int:
    from tandem.cluster.launcher import connect
    from tandem.deploy.ray_session import connect_ray

    connect_ray(args.address, local_ok=False)
    try:
        stats = connect(args.name).stats()
    except LookupError as exc:
        raise CommandError(str(exc)) from exc
    if args.json:
        print(json.dumps(stats, indent=1))
        return 0
    print(f"{args.name}: {stats['requests']} requests in flight")
    moves = stats["migrations"]
    print(f"migrations: {moves['in_flight']} in flight; {moves['committed']} committed, "
          f"{moves['resumed']} resumed at their source and {moves['cancelled']} given up in pre-copy, "
          f"of {moves['started']} started; rebalancing {'on' if moves['rebalancing'] else 'off'}")
    print(f"{'instance':32} {'free/total blocks':>18} {'waiting':>8} {'running':>8}")
    for name, s in stats["instances"].items():
        if "error" in s:
            print(f"{name:32} ERROR {s['error']}")
            continue
        blocks = f"{s['free_blocks']}/{s['num_blocks']}"
        print(f"{name:32} {blocks:>18} {s['waiting']:>8} {s['running']:>8}")
    return 0


def _drain(args: argparse.Namespace) -> int:
    from tandem.cluster.launcher import connect
    from tandem.deploy.ray_session import connect_ray

    connect_ray(args.address, local_ok=False)
    try:
        result = connect(args.name).drain(args.instance, args.timeout)
    except (LookupError, ValueError) as exc:
        raise CommandError(str(exc)) from exc
    print(f"{args.instance}: {result['moved']} requests moved, {result['left']} left; it takes no new requests")
    return 0 if result["left"] == 0 else 1


def _shutdown(args: argparse.Namespace) -> int:
    from tandem.cluster.launcher import shutdown_by_name
    from tandem.deploy.ray_session import connect_ray

    connect_ray(args.address, local_ok=False)
    try:
        stopped = shutdown_by_name(args.name)
    except LookupError as exc:
        raise CommandError(str(exc)) from exc
    print(f"stopped {len(stopped)} actors of {args.name!r}")
    return 0
