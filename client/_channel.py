"""Channel set-up shared by both clients: targets, limits, retries (gRPC service config), TLS, bearer token."""
import ipaddress
import json
import os
import socket

import grpc

from ._errors import invalid_argument

__all__ = ["ChannelSettings", "DEFAULT_MAX_MESSAGE_MB", "DEFAULT_RETRY_ATTEMPTS", "normalize_target"]

#: Raised from gRPC's 4 MiB default: 10 of the 21 benchmark layers have a tensor over it. Matches the server default.
DEFAULT_MAX_MESSAGE_MB = 256
#: Attempts per call (first + retries) when the server is UNAVAILABLE (restarting, not yet listening, ...).
DEFAULT_RETRY_ATTEMPTS = 4
DEFAULT_KEEPALIVE_MS = 30_000

#: What gRPC may retry on UNAVAILABLE: our service (every method is safe to repeat: Infer and Conv compute, the model
#: calls are idempotent or refuse a repeat), health, and KServe's ModelInfer (the SDK's shared-memory path), which is
#: idempotent; not the rest of KServe (a repeated shared-memory registration would find its own first attempt).
_RETRIED = ({"service": "convservice.v1.ConvService"}, {"service": "grpc.health.v1.Health"},
            {"service": "inference.GRPCInferenceService", "method": "ModelInfer"})
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def _service_config(attempts):
    config = {"loadBalancingConfig": [{"round_robin": {}}]}  # spread calls over every address of the target
    if attempts > 1:
        config["methodConfig"] = [{
            "name": list(_RETRIED),
            # gRPC retries transparently, with backoff, and only while the request fits its retry buffer.
            "retryPolicy": {
                "maxAttempts": attempts,
                "initialBackoff": "0.1s",
                "maxBackoff": "2s",
                "backoffMultiplier": 2,
                "retryableStatusCodes": ["UNAVAILABLE"],
            },
        }]
    return json.dumps(config)


def _split_host_port(item):
    item = item.strip()
    if item.startswith("["):  # [v6]:port
        host, _, port = item[1:].partition("]:")
    else:
        host, _, port = item.rpartition(":")
    if not host or not port.isdigit():
        raise invalid_argument(f"target entry {item!r} must be host:port")
    return host, int(port)


def normalize_target(target):
    """Return a gRPC target for `target`.

    A single ``host:port`` or any gRPC URI (``dns:///h:p``, ``ipv4:...``, ``unix:...``) is used as given. A comma list
    ``"h1:p1,h2:p2"`` is resolved once, here, into gRPC's native address list (``ipv4:a:p1,b:p2``) so that the
    round_robin policy spreads calls over every server.
    """
    if not isinstance(target, str) or not target.strip():
        raise invalid_argument(f"target must be a non-empty 'host:port' string, got {target!r}")
    target = target.strip()
    if "," not in target or target.startswith(_SCHEMES) or "://" in target:
        return target
    v4, v6 = [], []
    for host, port in [_split_host_port(item) for item in target.split(",")]:  # all checked before any lookup
        item = f"{host}:{port}"
        try:
            ip = ipaddress.ip_address(host)
            (v4 if ip.version == 4 else v6).append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
            continue
        except ValueError:
            pass
        try:
            infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
        except socket.gaierror as exc:
            raise invalid_argument(f"target entry {item!r}: cannot resolve {host!r} ({exc})") from None
        addrs = [i[4][0] for i in infos if i[0] == socket.AF_INET] or [i[4][0] for i in infos]
        ip = ipaddress.ip_address(addrs[0])
        (v4 if ip.version == 4 else v6).append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if v4 and v6:
        raise invalid_argument(f"target {target!r} mixes IPv4 and IPv6 addresses; use one family")
    return ("ipv4:" + ",".join(v4)) if v4 else ("ipv6:" + ",".join(v6))


def _read_pem(value, name):
    if value is None or isinstance(value, bytes):
        return value
    if isinstance(value, (str, os.PathLike)):
        with open(value, "rb") as f:
            return f.read()
    raise invalid_argument(f"{name} must be PEM bytes or a file path, got {type(value).__name__}")


class ChannelSettings:
    """Everything needed to open a channel and call on it; built once per client.

    Parameters
    ----------
    target, timeout, max_message_mb, root_certificates, tls, token, options, retries, client_certificate, client_key
        See `ConvClient`.
    """

    def __init__(self, target, timeout, max_message_mb, root_certificates, tls, token, options, retries, *,
                 client_certificate=None, client_key=None):
        if timeout is not None and not (isinstance(timeout, (int, float)) and timeout > 0):
            raise invalid_argument(f"timeout must be a positive number of seconds or None, got {timeout!r}")
        if isinstance(max_message_mb, bool) or not isinstance(max_message_mb, int) or not 1 <= max_message_mb <= 2047:
            raise invalid_argument(f"max_message_mb must be an int from 1 to 2047, got {max_message_mb!r}")
        if isinstance(retries, bool) or not isinstance(retries, int) or not 1 <= retries <= 5:
            raise invalid_argument(f"retries must be an int from 1 (no retry) to 5 (gRPC's cap), got {retries!r}")
        self.target = normalize_target(target)
        self.timeout = timeout
        self.max_message_mb = max_message_mb
        limit = max_message_mb << 20
        merged = {
            "grpc.max_send_message_length": limit,
            "grpc.max_receive_message_length": limit,
            "grpc.service_config": _service_config(retries),
            "grpc.enable_retries": 1 if retries > 1 else 0,
            # gRPC keeps a request for a retry only up to this size, 256 KiB by default, and commits (never
            # retries) a larger one: a 1x64x56x56 float32 Infer is 0.8 MB. The request bytes are alive during the
            # call anyway; this only keeps them until the answer starts.
            "grpc.per_rpc_retry_buffer_size": limit,
            "grpc.keepalive_time_ms": DEFAULT_KEEPALIVE_MS,
            "grpc.keepalive_timeout_ms": 10_000,
        }
        merged.update(dict(options or ()))  # the escape hatch: any channel argument, overriding the defaults
        self.options = list(merged.items())
        root = _read_pem(root_certificates, "root_certificates")
        if (client_certificate is None) != (client_key is None):
            raise invalid_argument("client_certificate and client_key go together (mutual TLS): give both or neither")
        cert = _read_pem(client_certificate, "client_certificate")
        key = _read_pem(client_key, "client_key")
        if tls or root is not None or cert is not None:
            self.credentials = grpc.ssl_channel_credentials(root, private_key=key, certificate_chain=cert)
        else:
            self.credentials = None
        self.metadata = (("authorization", f"Bearer {token}"),) if token else None

    def channel(self):
        if self.credentials is not None:
            return grpc.secure_channel(self.target, self.credentials, options=self.options)
        return grpc.insecure_channel(self.target, options=self.options)

    def aio_channel(self):
        if self.credentials is not None:
            return grpc.aio.secure_channel(self.target, self.credentials, options=self.options)
        return grpc.aio.insecure_channel(self.target, options=self.options)
