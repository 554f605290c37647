"""TLS for the server port: certificate and key files, optionally a client CA for mutual TLS."""
import grpc

__all__ = ["server_credentials"]


def _read(path, what, flag):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise ValueError(f"{flag} {path!r}: cannot read the {what}: {exc.strerror or exc}") from None
    if b"-----BEGIN" not in data:
        raise ValueError(f"{flag} {path!r}: not a PEM file (no '-----BEGIN' line); the {what} must be PEM-encoded")
    return data


def server_credentials(cert_file, key_file, client_ca_file=None):
    """Build gRPC server credentials from PEM files.

    Parameters
    ----------
    cert_file, key_file : str
        The server's certificate chain and private key (``--tls-cert``, ``--tls-key``).
    client_ca_file : str, optional
        CA certificates that client certificates must chain to (``--tls-client-ca``). When given, clients must
        present a certificate (mutual TLS); without one the handshake fails, before any RPC runs.

    Returns
    -------
    grpc.ServerCredentials

    Raises
    ------
    ValueError
        If only one of cert/key is given, or a file cannot be read or is not PEM.
    """
    if bool(cert_file) != bool(key_file):
        raise ValueError("--tls-cert and --tls-key go together: give both (or neither, for plaintext)")
    if client_ca_file and not cert_file:
        raise ValueError("--tls-client-ca needs --tls-cert and --tls-key: mutual TLS is TLS first")
    cert = _read(cert_file, "certificate", "--tls-cert")
    key = _read(key_file, "private key", "--tls-key")
    ca = _read(client_ca_file, "client CA certificates", "--tls-client-ca") if client_ca_file else None
    return grpc.ssl_server_credentials([(key, cert)], root_certificates=ca, require_client_auth=ca is not None)
