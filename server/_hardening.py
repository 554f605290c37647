"""Command-line flags and interceptors for limits, TLS and access control, in one place for `python -m server`.

`add_arguments` adds the flags to the server's parser; `apply_arguments` turns them into `ServerConfig` fields;
`create_server` calls `hardening_interceptors` and `request_limit_options`. Defaults live in `ServerConfig`.
"""
import argparse

from ._auth import TokenAuthInterceptor, read_token_file
from ._config import MIB
from ._tls import server_credentials

__all__ = ["add_arguments", "apply_arguments", "hardening_interceptors", "request_limit_options"]


def _positive_int(text):
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _positive_float(text):
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, got {text}")
    return value


def add_arguments(parser, defaults):
    """Add the limit, TLS and auth flags to `parser`; `defaults` is ``ServerConfig.__dataclass_fields__``."""
    g = parser.add_argument_group("limits")
    g.add_argument("--max-request-mb", type=_positive_int, default=None, metavar="MB",
                   help="largest request accepted, MiB (default: --max-message-mb); over it: RESOURCE_EXHAUSTED")
    g.add_argument("--max-output-mb", type=_positive_int, default=defaults["max_output_mb"].default, metavar="MB",
                   help="largest output a call may compute, MiB, checked before allocating")
    g.add_argument("--max-layers", type=_positive_int, default=defaults["max_layers"].default, metavar="N",
                   help="layers per registered model")
    g.add_argument("--max-models", type=_positive_int, default=defaults["max_models"].default, metavar="N",
                   help="registered models")
    g.add_argument("--max-in-flight", type=_positive_int, default=defaults["max_in_flight"].default, metavar="N",
                   help="requests being served at once; one more gets RESOURCE_EXHAUSTED at once (no queue)")
    g.add_argument("--default-deadline", type=_positive_float, default=defaults["default_deadline"].default,
                   metavar="SECONDS", help="deadline of calls whose client set none")
    s = parser.add_argument_group("security")
    s.add_argument("--tls-cert", metavar="PEM", help="serve TLS with this certificate chain (with --tls-key)")
    s.add_argument("--tls-key", metavar="PEM", help="private key of --tls-cert")
    s.add_argument("--tls-client-ca", metavar="PEM",
                   help="require client certificates signed by these CAs (mutual TLS)")
    s.add_argument("--auth-token", metavar="TOKEN",
                   help="require 'authorization: Bearer TOKEN' on every RPC but health (visible in ps: prefer "
                        "--auth-token-file)")
    s.add_argument("--auth-token-file", metavar="PATH", help="read the token from this file")
    s.add_argument("--read-only-models", action="store_true",
                   help="refuse RegisterModel/DeleteModel (PERMISSION_DENIED); serve the repository's models")


def apply_arguments(args, config_kwargs):
    """Fill `config_kwargs` (for ServerConfig) from parsed `args`. Raises ValueError for bad TLS/token files."""
    if args.auth_token and args.auth_token_file:
        raise ValueError("give --auth-token or --auth-token-file, not both")
    token = read_token_file(args.auth_token_file) if args.auth_token_file else args.auth_token
    credentials = None
    if args.tls_cert or args.tls_key or args.tls_client_ca:
        credentials = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    config_kwargs.update(
        max_request_mb=args.max_request_mb, max_output_mb=args.max_output_mb, max_layers=args.max_layers,
        max_models=args.max_models, max_in_flight=args.max_in_flight, default_deadline=args.default_deadline,
        auth_token=token or None, read_only_models=args.read_only_models, server_credentials=credentials)
    return config_kwargs


def hardening_interceptors(config):
    """The interceptors for `config`: the token check of the RPCs that are not wrapped unary handlers (streaming
    reflection).

    Everything else is applied once per method by `server._handlers.MethodWrapper` (undecodable requests, token,
    read-only models, default deadline) and, as calls arrive, by `server._limits.AdmissionInterceptor`
    (``--max-in-flight``), which `create_server` adds since it needs the worker pool.
    """
    return [TokenAuthInterceptor(config.auth_token)] if config.auth_token else []


def request_limit_options(config):
    """gRPC server options for ``--max-request-mb`` (empty when it follows --max-message-mb)."""
    if config.max_request_mb is None:
        return []
    return [("grpc.max_receive_message_length", config.max_request_mb * MIB)]
