"""``python -m server.healthcheck``: ask a server's ``grpc.health.v1`` service whether it is SERVING; exit 0 if so.

The container's ``HEALTHCHECK`` and compose's ``healthcheck`` run this (``grpc_health_probe`` is a separate binary
download, which an offline image build cannot fetch). Exit status: 0 SERVING, 1 anything else (NOT_SERVING,
SERVICE_UNKNOWN, unreachable, deadline exceeded), 2 bad command line, as Docker expects of a health command.
"""
import argparse
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

__all__ = ["check", "main"]


def check(target, service="", timeout=3.0):
    """Query the health of ``service`` at ``target``.

    Parameters
    ----------
    target : str
        ``HOST:PORT``.
    service : str
        Service name; ``""`` asks about the server as a whole.
    timeout : float
        Seconds for the whole check, connecting included.

    Returns
    -------
    (bool, str)
        Whether it is SERVING, and the status name or the error that prevented an answer.
    """
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout)
        except grpc.RpcError as exc:
            return False, f"{exc.code().name}: {exc.details()}"
    name = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return reply.status == health_pb2.HealthCheckResponse.SERVING, name


def main(argv=None):
    """Run the check; return the exit status (0 serving, 1 not)."""
    p = argparse.ArgumentParser(prog="python -m server.healthcheck", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="server address (default: %(default)s)")
    p.add_argument("--port", type=int, default=50051, help="server port (default: %(default)s)")
    p.add_argument("--service", default="", help="service to ask about (default: the whole server)")
    p.add_argument("--timeout", type=float, default=3.0, help="seconds (default: %(default)s)")
    args = p.parse_args(argv)
    host = f"[{args.host}]" if ":" in args.host and not args.host.startswith("[") else args.host
    ok, status = check(f"{host}:{args.port}", args.service, args.timeout)
    print(f"{host}:{args.port} {args.service or '(server)'}: {status}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
