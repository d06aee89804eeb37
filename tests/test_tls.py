"""`serve --ssl-certfile/--ssl-keyfile`: HTTPS through uvicorn's own TLS. The real `medgemma-edge
serve` process answers the `openai` client that trusts the test's own CA (made here with
`cryptography`: a CA, and a server certificate it signs for 127.0.0.1 and localhost); a client
without that CA and a plain-HTTP client are refused. A certificate that cannot be loaded is one
line, exit 2, before the port opens; a non-loopback bind without TLS warns once."""

from __future__ import annotations

import datetime
import ipaddress
import logging
import ssl

import httpx
import openai
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from medgemma_edge.cli import main
from medgemma_edge.server import ServerConfig, runner
from medgemma_edge.testing.pacs import free_port
from medgemma_edge.testing.serve import ServeProcess


def _certificate(subject: str, key, issuer_name: str, issuer_key, *, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
               .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer_name)]))
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if ca:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
        builder = builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    else:
        builder = builder.add_extension(x509.SubjectAlternativeName(
            [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
        builder = builder.add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]),
                                        critical=False)
        builder = builder.add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
                                        critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """ca.pem, cert.pem (127.0.0.1 and localhost, signed by the CA), key.pem (unencrypted)."""
    root = tmp_path_factory.mktemp("pki")
    ca_key, key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _certificate("medgemma-edge test CA", ca_key, "medgemma-edge test CA", ca_key, ca=True)
    cert = _certificate("localhost", key, "medgemma-edge test CA", ca_key, ca=False)
    (root / "ca.pem").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    (root / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (root / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                     serialization.NoEncryption()))
    return root


def test_the_openai_client_with_the_sites_ca_is_answered_over_https(tiny_bundle_f32, pki, tmp_path):
    port = free_port()
    args = ["-m", tiny_bundle_f32, "--port", port, "--threads", 2, "--context", 2048,
            "--ssl-certfile", pki / "cert.pem", "--ssl-keyfile", pki / "key.pem"]
    with ServeProcess(args, tmp_path / "serve.log", port, ready_s=300, ca=pki / "ca.pem") as served:
        assert served.url.startswith("https://")
        with httpx.Client(verify=ssl.create_default_context(cafile=str(pki / "ca.pem")), timeout=120) as http:
            client = openai.OpenAI(base_url=served.url + "/v1", api_key="unused", max_retries=0, http_client=http)
            reply = client.chat.completions.create(model="any", max_tokens=3,
                                                   messages=[{"role": "user", "content": "Hi"}])
            assert reply.choices[0].finish_reason in ("stop", "length") and reply.usage.completion_tokens >= 1
        with pytest.raises(httpx.ConnectError, match="CERTIFICATE_VERIFY_FAILED"):
            httpx.get(served.url + "/health")  # the system's CAs do not know the test CA
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health")  # plain HTTP on a TLS port: no answer
    log = (tmp_path / "serve.log").read_text()
    print(log[-2000:])
    assert "plain HTTP" not in log  # loopback: no warning


@pytest.mark.parametrize("damage", ["garbage certificate", "key of another certificate", "encrypted key",
                                    "missing file", "key without certificate"])
def test_a_certificate_that_cannot_be_loaded_is_one_line_before_the_port_opens(
        tiny_bundle_f32, pki, tmp_path, monkeypatch, capsys, damage):
    cert, key = pki / "cert.pem", pki / "key.pem"
    if damage == "garbage certificate":
        cert = tmp_path / "cert.pem"
        cert.write_text("-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n")
    elif damage == "key of another certificate":
        key = tmp_path / "other.pem"
        key.write_bytes(ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    elif damage == "encrypted key":  # refused, never prompted for on a terminal a service does not have
        key = tmp_path / "locked.pem"
        private = serialization.load_pem_private_key((pki / "key.pem").read_bytes(), None)
        key.write_bytes(private.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                              serialization.BestAvailableEncryption(b"secret")))
    elif damage == "missing file":
        cert = tmp_path / "nowhere.pem"
    opened, loads = [], []
    monkeypatch.setattr(runner, "listening_socket", lambda *a: opened.append(a))
    monkeypatch.setattr("medgemma_edge.load", lambda *a, **k: loads.append(a))
    args = ["serve", "-m", str(tiny_bundle_f32), "--ssl-keyfile", str(key)]
    if damage != "key without certificate":
        args += ["--ssl-certfile", str(cert)]
    with pytest.raises(SystemExit) as exit_:
        main.main(args, prog_name="medgemma-edge")
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    print(damage, lines)
    assert exit_.value.code == 2 and len(lines) == 1 and lines[0].startswith("error: --ssl-")
    assert "_ssl.c" not in lines[0]  # what to do, not where OpenSSL failed
    assert opened == [] and loads == []


class _NotRun:
    """uvicorn.Server that returns at once: `serve` is followed up to the point it would listen."""

    def __init__(self, config):
        self.config, self.should_exit = config, False

    def run(self, sockets=None):
        pass


@pytest.mark.parametrize("host,tls,warned", [("0.0.0.0", False, 1), ("0.0.0.0", True, 0), ("127.0.0.1", False, 0)])
def test_a_non_loopback_bind_without_tls_warns_once(pki, monkeypatch, caplog, host, tls, warned):
    monkeypatch.setattr(runner.uvicorn, "Server", _NotRun)
    monkeypatch.setattr(runner, "logging_config", lambda: None)  # pytest's logging stays as it is
    tls_files = dict(ssl_certfile=str(pki / "cert.pem"), ssl_keyfile=str(pki / "key.pem")) if tls else {}
    caplog.set_level(logging.INFO, logger="medgemma_edge")
    runner.serve(lambda: None, ServerConfig(host=host, port=0, api_key="k", **tls_files))
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    print(warnings)
    assert len(warnings) == warned and all("plain HTTP" in w and "--ssl-certfile" in w for w in warnings)
