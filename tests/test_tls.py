"""HTTPS to a Label Studio whose certificate a company CA signed: one setting (TESSERA_CA_BUNDLE, or the
SSL_CERT_FILE / REQUESTS_CA_BUNDLE a machine already has) makes media downloads and API calls trust it alike.
Before, media (requests) read only REQUESTS_CA_BUNDLE and the API (httpx) only SSL_CERT_FILE, so half of
Tessera failed whichever one was set, with "SSLError" / "ConnectError" and no advice.

A real TLS listener on 127.0.0.1, its certificate signed by a CA made here (cryptography)."""
import datetime
import io
import ipaddress
import json
import ssl

import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from PIL import Image

from tessera.backend import lsclient
from tessera.backend.media import MediaError, MediaResolver
from tessera.backend.settings import Settings
from tests.standin import start

TOKEN = "tls-test-token-0123456789"


def _cert(subject: str, key, issuer_name, issuer_key, ca: bool) -> x509.Certificate:
    now = datetime.datetime.now(datetime.timezone.utc)
    b = (x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
         .issuer_name(issuer_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
         .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
         .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if not ca:
        b = b.add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                            critical=False)
    return b.sign(issuer_key, hashes.SHA256())


def _pem(obj) -> bytes:
    if isinstance(obj, x509.Certificate):
        return obj.public_bytes(serialization.Encoding.PEM)
    return obj.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def _png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((12, 16, 3), 77, np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def _answer(path: str):
    if path.startswith("/data/upload/"):
        return 200, {}, _png()
    return 200, {"Content-Type": "application/json"}, json.dumps({"id": 1, "title": "p"}).encode()


@pytest.fixture(scope="module")
def https_ls(tmp_path_factory):
    """(origin, CA file): a listener on 127.0.0.1 serving HTTPS with a certificate the CA signed."""
    d = tmp_path_factory.mktemp("tls")
    ca_key, srv_key = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ca = _cert("Tessera test CA", ca_key, x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "Tessera test CA")]),
               ca_key, ca=True)
    srv = _cert("127.0.0.1", srv_key, ca.subject, ca_key, ca=False)
    (d / "ca.pem").write_bytes(_pem(ca))
    (d / "srv.pem").write_bytes(_pem(srv) + _pem(ca))
    (d / "srv.key").write_bytes(_pem(srv_key))
    server = start(_answer)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(d / "srv.pem", d / "srv.key")
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    yield server.url.replace("http://", "https://"), d / "ca.pem", server
    server.shutdown()


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("TESSERA_CA_BUNDLE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_an_untrusted_certificate_is_named_with_the_setting_that_fixes_it(https_ls, clean_env, tmp_path):
    url, _, _ = https_ls
    s = Settings(model_dir=tmp_path, label_studio_url=url, label_studio_api_key=TOKEN)
    with pytest.raises(MediaError, match="TLS certificate is not trusted; give your CA as TESSERA_CA_BUNDLE"):
        MediaResolver(s).fetch("/data/upload/1/a.png")
    with pytest.raises(lsclient.LabelStudioUnavailable, match="TLS certificate is not trusted.*TESSERA_CA_BUNDLE"):
        lsclient.project(lsclient.from_settings(s), 1)


@pytest.mark.parametrize("variable", ["TESSERA_CA_BUNDLE", "SSL_CERT_FILE", "REQUESTS_CA_BUNDLE"])
def test_one_ca_setting_serves_media_and_the_api_alike(https_ls, clean_env, tmp_path, variable):
    url, ca, server = https_ls
    for name, value in {variable: str(ca), "MODEL_DIR": str(tmp_path), "LABEL_STUDIO_URL": url,
                        "LABEL_STUDIO_API_KEY": TOKEN}.items():
        clean_env.setenv(name, value)
    s = Settings.from_env()
    assert s.ca_bundle == ca
    server.seen.clear()
    assert MediaResolver(s).load_image("/data/upload/1/a.png").shape == (12, 16, 3)
    assert lsclient.project(lsclient.from_settings(s), 1).title == "p"
    assert [a for _, a in server.seen] == [f"Token {TOKEN}"] * 2


def test_a_missing_ca_file_stops_the_start_with_its_name(clean_env, tmp_path):
    clean_env.setenv("SSL_CERT_FILE", str(tmp_path / "gone.pem"))
    with pytest.raises(ValueError, match=r"SSL_CERT_FILE.*no file at .*gone\.pem"):
        Settings.from_env()
