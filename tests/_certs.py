"""Test certificates made at test time: a CA, a server certificate for 127.0.0.1/localhost, client certificates.

Uses the `cryptography` package when it is installed, else the `openssl` command line. Nothing is committed: keys
made for a test live in the test's temporary folder.

>>> pki = make_pki(tmp_path)                      # doctest: +SKIP
>>> pki.server_cert, pki.server_key, pki.ca_cert  # paths of PEM files
"""
import datetime
import os
import shutil
import subprocess
from dataclasses import dataclass

__all__ = ["PKI", "make_pki"]


@dataclass
class PKI:
    """Paths of the PEM files of one test PKI."""
    ca_cert: str
    server_cert: str
    server_key: str
    client_cert: str
    client_key: str
    other_ca_cert: str      # a second CA that signed nothing we trust
    rogue_client_cert: str  # a client certificate signed by the other CA
    rogue_client_key: str

    def read(self, name):
        with open(getattr(self, name), "rb") as f:
            return f.read()


def make_pki(folder):
    """Create a CA, a server certificate (SAN 127.0.0.1, ::1, localhost) and client certificates in `folder`."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    try:
        import cryptography  # noqa: F401
    except ImportError:
        if shutil.which("openssl") is None:
            import pytest
            pytest.skip("neither the cryptography package nor the openssl command is available")
        return _make_with_openssl(folder)
    return _make_with_cryptography(folder)


# ----------------------------------------------------------------------------------------------------------------------
def _make_with_cryptography(folder):
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    now = datetime.datetime.now(datetime.timezone.utc)

    def key():
        return ec.generate_private_key(ec.SECP256R1())  # fast to make, unlike RSA

    def name(cn):
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def write(path, data):
        with open(path, "wb") as f:
            f.write(data)
        return path

    def write_key(path, k):
        return write(path, k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))

    def write_cert(path, cert):
        return write(path, cert.public_bytes(serialization.Encoding.PEM))

    def ca(cn):
        k = key()
        cert = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn)).public_key(k.public_key())
                .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
                .not_valid_after(now + datetime.timedelta(days=1))
                .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
                .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                             content_commitment=False, key_encipherment=False,
                                             data_encipherment=False, key_agreement=False, encipher_only=False,
                                             decipher_only=False), critical=True)
                .sign(k, hashes.SHA256()))
        return k, cert

    def leaf(cn, ca_key, ca_cert, server):
        k = key()
        builder = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
                   .public_key(k.public_key()).serial_number(x509.random_serial_number())
                   .not_valid_before(now - datetime.timedelta(minutes=5))
                   .not_valid_after(now + datetime.timedelta(days=1))
                   .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                   .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server
                                                         else ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False))
        if server:
            builder = builder.add_extension(x509.SubjectAlternativeName([
                x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                x509.IPAddress(ipaddress.ip_address("::1"))]), critical=False)
        return k, builder.sign(ca_key, hashes.SHA256())

    ca_key, ca_cert = ca("convcore-test-ca")
    other_key, other_cert = ca("convcore-other-ca")
    s_key, s_cert = leaf("localhost", ca_key, ca_cert, server=True)
    c_key, c_cert = leaf("client", ca_key, ca_cert, server=False)
    r_key, r_cert = leaf("rogue", other_key, other_cert, server=False)
    j = lambda n: os.path.join(folder, n)  # noqa: E731
    return PKI(ca_cert=write_cert(j("ca.pem"), ca_cert), server_cert=write_cert(j("server.pem"), s_cert),
               server_key=write_key(j("server.key"), s_key), client_cert=write_cert(j("client.pem"), c_cert),
               client_key=write_key(j("client.key"), c_key), other_ca_cert=write_cert(j("other-ca.pem"), other_cert),
               rogue_client_cert=write_cert(j("rogue.pem"), r_cert), rogue_client_key=write_key(j("rogue.key"), r_key))


# ----------------------------------------------------------------------------------------------------------------------
def _openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _make_with_openssl(folder):
    def ca(prefix, cn):
        _openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-days", "1",
                 "-subj", f"/CN={cn}", "-keyout", f"{prefix}.key", "-out", f"{prefix}.pem", cwd=folder)

    def leaf(prefix, cn, ca_prefix, ext):
        with open(os.path.join(folder, f"{prefix}.ext"), "w") as f:
            f.write(ext)
        _openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes", "-subj", f"/CN={cn}",
                 "-keyout", f"{prefix}.key", "-out", f"{prefix}.csr", cwd=folder)
        _openssl("x509", "-req", "-in", f"{prefix}.csr", "-CA", f"{ca_prefix}.pem", "-CAkey", f"{ca_prefix}.key",
                 "-CAcreateserial", "-days", "1", "-extfile", f"{prefix}.ext", "-out", f"{prefix}.pem", cwd=folder)

    ca("ca", "convcore-test-ca")
    ca("other-ca", "convcore-other-ca")
    leaf("server", "localhost", "ca", "subjectAltName=DNS:localhost,IP:127.0.0.1,IP:::1\n"
                                      "extendedKeyUsage=serverAuth\n")
    leaf("client", "client", "ca", "extendedKeyUsage=clientAuth\n")
    leaf("rogue", "rogue", "other-ca", "extendedKeyUsage=clientAuth\n")
    j = lambda n: os.path.join(folder, n)  # noqa: E731
    return PKI(ca_cert=j("ca.pem"), server_cert=j("server.pem"), server_key=j("server.key"),
               client_cert=j("client.pem"), client_key=j("client.key"), other_ca_cert=j("other-ca.pem"),
               rogue_client_cert=j("rogue.pem"), rogue_client_key=j("rogue.key"))
