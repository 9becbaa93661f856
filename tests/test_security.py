"""Security at the edge: who may connect, TLS with client certificates, files
at rest, and what logs and metrics never carry.

Certificates are made per test run in its temporary directory: one CA that
signs the gateway's, the archive's and the scanner's certificates, and a
second CA, unknown to the gateway, that signs an impostor's.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
import stat
import struct
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydicom import dcmread
from pynetdicom import AE

from gateway import metrics
from gateway.config import DEFAULT_CONFIG_YAML, parse_config
from gateway.node import Node
from gateway.synthetic import PlantedPHI, SyntheticStudy, write_secondary_capture, write_sr
from tests.peers import DCMTK_ENV, STORESCP, STORESCU, Gateway, free_port, stop, wait_for_port
from tests.reliability import http_get, wait_until

SR = "1.2.840.10008.5.1.4.1.1.88.33"
ONE_DAY = datetime.timedelta(days=1)


# --------------------------------------------------------------- who may connect


def associate(port: int, calling: str, called: str = "DEID_GATEWAY") -> tuple[bool, bool]:
    """(established, rejected) of one association proposing the SR class."""
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = 10
    ae.add_requested_context(SR)
    assoc = ae.associate("127.0.0.1", port, ae_title=called)
    established, rejected = assoc.is_established, assoc.is_rejected
    if established:
        assoc.release()
    return established, rejected


def rejections(reason: str) -> float:
    value = metrics.REGISTRY.get_sample_value(
        "deid_gateway_associations_rejected_total", {"reason": reason}
    )
    return 0.0 if value is None else value


@pytest.fixture
def allowlist_node(tmp_path: Path, key_file: Path) -> Iterator[Node]:
    """SCANNER may call from 127.0.0.1 only, REMOTE only from a network this test is not on."""
    config = parse_config({
        "listen": {"host": "127.0.0.1", "port": 0},
        "allowed_callers": [
            {"ae_title": "SCANNER", "hosts": ["127.0.0.1"]},
            {"ae_title": "REMOTE", "hosts": ["10.9.0.0/16", "127.0.0.2"]},
        ],
        "spool_dir": str(tmp_path / "spool"),
        "key_file": str(key_file),
        "profile": "research",
        "destinations": [{"name": "archive", "folder": str(tmp_path / "archive")}],
        "limits": {"min_free_bytes": 0},
    }, tmp_path)
    running = Node(config)
    running.start()
    yield running
    running.stop()


@pytest.mark.integration
def test_unknown_ae_titles_and_addresses_are_rejected_before_negotiation(allowlist_node: Node) -> None:
    """test_node_edges covers an unknown AE title; here the address half of the
    pair, the reasons counted for each, and the called AE title."""
    assert allowlist_node.address is not None
    port = allowlist_node.address[1]
    before = {r: rejections(r) for r in ("calling-ae-not-allowed", "host-not-allowed")}
    assert associate(port, "SCANNER") == (True, False)
    # A known AE title from an address not listed for it.
    assert associate(port, "REMOTE") == (False, True)
    # An AE title nobody listed, and a title differing only in case.
    assert associate(port, "INTRUDER") == (False, True)
    assert associate(port, "scanner") == (False, True)
    # The right caller addressing another AE than the gateway.
    assert associate(port, "SCANNER", called="OTHER_NODE") == (False, True)
    assert rejections("host-not-allowed") - before["host-not-allowed"] == 1
    assert rejections("calling-ae-not-allowed") - before["calling-ae-not-allowed"] == 2
    assert list(allowlist_node.spool.incoming.iterdir()) == []
    assert allowlist_node.idle()


def _peak_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.mark.integration
def test_a_declared_pdu_length_costs_no_memory_until_its_bytes_arrive(allowlist_node: Node) -> None:
    """Anyone who can connect may declare a 2 GiB PDU before any check; the
    receiving process allocates as the bytes come, and keeps serving."""
    assert allowlist_node.address is not None and allowlist_node.receiver is not None
    pid = allowlist_node.receiver.pid
    assert pid is not None
    before = _peak_kib(pid)
    with socket.create_connection(("127.0.0.1", allowlist_node.address[1])) as sock:
        sock.sendall(struct.pack(">BBL", 0x01, 0, 2**31) + b"\0" * 1000)
        time.sleep(1)
        assert _peak_kib(pid) - before < 64 * 1024
    assert associate(allowlist_node.address[1], "SCANNER") == (True, False)
    assert allowlist_node.receiver.pid == pid


# ----------------------------------------------------------------- certificates


@dataclass(frozen=True)
class Party:
    """A certificate and its private key, as PEM files."""

    cert: Path
    key: Path


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _write(directory: Path, stem: str, cert: x509.Certificate, key: rsa.RSAPrivateKey) -> Party:
    party = Party(directory / f"{stem}.pem", directory / f"{stem}.key")
    party.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    party.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ))
    party.key.chmod(0o600)
    return party


def make_ca(directory: Path, name: str) -> tuple[Party, x509.Certificate, rsa.RSAPrivateKey]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(_name(name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY)
        .not_valid_after(now + ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True, crl_sign=True,
            encipher_only=False, decipher_only=False,
        ), critical=True)
        .sign(key, hashes.SHA256())
    )
    return _write(directory, name, cert, key), cert, key


def issue(directory: Path, name: str, ca: tuple[Party, x509.Certificate, rsa.RSAPrivateKey]) -> Party:
    """A leaf certificate for 127.0.0.1, good for TLS server and client use."""
    _, ca_cert, ca_key = ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(name))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - ONE_DAY)
        .not_valid_after(now + ONE_DAY)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.SubjectAlternativeName(
            [x509.IPAddress(ipaddress.ip_address("127.0.0.1")), x509.DNSName("localhost")]
        ), critical=False)
        .add_extension(x509.ExtendedKeyUsage(
            [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
        ), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return _write(directory, name, cert, key)


def tls_storescu(port: int, files: list[Path], ca: Path, client: Party | None,
                 ) -> subprocess.CompletedProcess[str]:
    """dcmtk's storescu over TLS, verifying the gateway against ``ca``; with
    ``client`` it presents that certificate, without it none."""
    credentials = ["+tls", str(client.key), str(client.cert)] if client else ["+tla"]
    return subprocess.run(
        [STORESCU, *credentials, "+cf", str(ca), "-aet", "SCANNER", "-aec", "DEID_GATEWAY",
         "-R", "-xy", "-nh", "127.0.0.1", str(port), *map(str, files)],
        env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False,
        stdin=subprocess.DEVNULL,
    )


def private(path: Path) -> bool:
    return stat.S_IMODE(path.stat().st_mode) & 0o077 == 0


@pytest.mark.integration
def test_tls_with_client_certificates_end_to_end(
    tmp_path: Path, key_file: Path, synthetic_study: SyntheticStudy, planted_tokens: list[str]
) -> None:
    """scanner --TLS, client certificate--> gateway --TLS, client certificate--> storescp.

    A scanner with a certificate from the gateway's client CA gets through and
    its instances arrive de-identified; one without a certificate, one with a
    certificate from another CA and one speaking plain TCP get nothing in.
    """
    pki = tmp_path / "pki"
    pki.mkdir()
    ca = make_ca(pki, "hospital-ca")
    gateway_party = issue(pki, "gateway", ca)
    archive_party = issue(pki, "archive", ca)
    scanner = issue(pki, "scanner", ca)
    impostor = issue(pki, "impostor", make_ca(pki, "other-ca"))
    ca_file = ca[0].cert

    received = tmp_path / "archive"
    received.mkdir()
    scp_port = free_port()
    scp = subprocess.Popen(
        [STORESCP, "+tls", str(archive_party.key), str(archive_party.cert), "+cf", str(ca_file),
         "-aet", "ARCHIVE", "-od", str(received), "+xa", str(scp_port)],
        env=DCMTK_ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    metrics_port = free_port()
    work = tmp_path / "gw"
    gateway = Gateway(work, {
        "tls": {"cert_file": str(gateway_party.cert), "key_file": str(gateway_party.key),
                "client_ca_file": str(ca_file)},
        "allowed_callers": [{"ae_title": "SCANNER", "hosts": ["127.0.0.1"]}],
        "spool_dir": str(work / "spool"),
        "key_file": str(key_file),
        "profile": "research",
        "destinations": [{"name": "archive", "ae_title": "ARCHIVE", "host": "127.0.0.1",
                          "port": scp_port,
                          "tls": {"ca_file": str(ca_file), "cert_file": str(gateway_party.cert),
                                  "key_file": str(gateway_party.key)}}],
        "limits": {"min_free_bytes": 0},
        "forwarding": {"backoff_initial": 0.2, "backoff_max": 1, "max_attempts": 20},
        "metrics": {"host": "127.0.0.1", "port": metrics_port},
        "mapping_dir": str(work / "evidence"),
    })
    # Sent: the SR and a slide's smallest VOLUME level; both are forwarded by the research profile.
    volumes = [p for p in synthetic_study.slides[1]
               if dcmread(p, stop_before_pixels=True).ImageType[2] == "VOLUME"]
    files = [synthetic_study.sr, min(volumes, key=lambda p: p.stat().st_size)]
    originals = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}
    try:
        wait_for_port(scp_port, scp)
        gateway.start()
        for client in (None, impostor):
            refused = tls_storescu(gateway.port, files[:1], ca_file, client)
            assert refused.returncode != 0, refused.stdout + refused.stderr
        plain = subprocess.run(
            [STORESCU, "-aet", "SCANNER", "-aec", "DEID_GATEWAY", "127.0.0.1", str(gateway.port),
             str(files[0])], env=DCMTK_ENV, capture_output=True, text=True, timeout=60, check=False,
        )
        assert plain.returncode != 0
        assert list((work / "spool" / "ready").iterdir()) == []

        sent = tls_storescu(gateway.port, files, ca_file, scanner)
        assert sent.returncode == 0, sent.stdout + sent.stderr
        assert wait_until(lambda: len(list(received.iterdir())) == len(files), 60), (
            gateway.log.read_text()[-2000:])
        assert wait_until(lambda: not any((work / "spool" / "ready").iterdir()), 30)
        _, body = http_get(f"http://127.0.0.1:{metrics_port}/metrics")
        log = gateway.log.read_text()
        modes = {path: private(path) for path in at_rest(work)}
    finally:
        gateway.stop()
        stop(scp)
    assert gateway.proc is not None and gateway.proc.returncode == 0

    arrived = [dcmread(p) for p in sorted(received.iterdir())]
    assert {str(ds.SOPInstanceUID) for ds in arrived}.isdisjoint(originals)
    content = b"".join(p.read_bytes() for p in received.iterdir())
    assert [t for t in planted_tokens if t.encode() in content] == []
    # Two TLS handshakes refused, one plain connection dropped: no association was accepted from them.
    assert log.count('"association.accepted"') == 1
    assert_nothing_secret(log + body, planted_tokens, key_file, [gateway_party, archive_party, scanner])
    assert modes and all(modes.values()), [str(p) for p, ok in modes.items() if not ok]


def at_rest(work: Path) -> list[Path]:
    """What a run leaves that holds originals or keys: spool, quarantine,
    audit store, mapping evidence (every file and directory under them)."""
    roots = [work / "spool", work / "quarantine", work / "evidence"]
    found = [root for root in roots if root.exists()]
    for root in found[:]:
        found += root.rglob("*")
    return found + sorted(work.glob("audit.sqlite*"))


def assert_nothing_secret(text: str, tokens: list[str], key_file: Path, parties: list[Party]) -> None:
    """No planted value, no de-identification key, no TLS private key in ``text``."""
    assert [t for t in tokens if t in text] == []
    key_hex = key_file.read_text().strip()
    assert key_hex.lower() not in text.lower() and key_hex[:16].lower() not in text.lower()
    for party in parties:
        pem = party.key.read_text()
        body = "".join(line for line in pem.splitlines() if "-----" not in line)
        assert body[:40] not in text.replace("\n", "")


# ------------------------------------------------------------- files at rest


@pytest.mark.integration
def test_files_at_rest_are_owner_only_after_a_real_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The embedded defaults under a permissive umask: the generated key, the
    spool, the quarantine (with an instance held in it) and the audit store
    are owner-only; /metrics carries neither the key nor a planted value
    (the log of a real ``serve`` is checked in the TLS test above)."""
    monkeypatch.chdir(tmp_path)
    previous = os.umask(0o022)
    try:
        data = yaml.safe_load(DEFAULT_CONFIG_YAML)
        data["listen"]["port"] = 0
        data["metrics"]["port"] = 0
        data["allowed_callers"][0]["ae_title"] = "SCANNER"
        node = Node(parse_config(data, tmp_path, generate_key=True))
        node.start()
        try:
            assert node.address is not None
            phi = PlantedPHI.create(91)
            held = write_secondary_capture(tmp_path / "sc.dcm", phi, True)  # burned-in text
            passed = write_sr(tmp_path / "sr.dcm", phi, held)
            for path in (held, passed):
                ds = dcmread(path, stop_before_pixels=True)
                ae = AE(ae_title="SCANNER")
                ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
                assoc = ae.associate("127.0.0.1", node.address[1], ae_title="DEID_GATEWAY")
                assert assoc.is_established
                assert int(assoc.send_c_store(path).Status) == 0
                assoc.release()
            assert wait_until(node.idle, 30)
            assert len(node.quarantine.ids()) == 1
            assert node.health is not None
            _, body = http_get(f"http://127.0.0.1:{node.health.port}/metrics")
        finally:
            node.stop()
    finally:
        os.umask(previous)
    data_dir = tmp_path / "gateway-data"
    checked = [data_dir / "gateway.key", data_dir / "audit.sqlite"]
    for root in (data_dir / "spool", data_dir / "quarantine"):
        checked += [root, *root.rglob("*")]
    loose = [str(p.relative_to(data_dir)) for p in checked if not private(p)]
    assert loose == []
    assert any(p.name == "instance.dcm" for p in (data_dir / "quarantine").rglob("*"))
    key_hex = (data_dir / "gateway.key").read_text().strip()
    assert key_hex not in body
    assert [t for t in phi.all_tokens() if t in body] == []
