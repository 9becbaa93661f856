"""The node's configuration: YAML, validated at start, with embedded defaults.

Every validation error names the key it is about (``destinations[1].port: ...``)
so an operator can fix the file without reading code. Relative paths are
resolved against the directory of the configuration file, or against the
working directory for the embedded defaults.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from pydicom import uid as uids
from pydicom._uid_dict import UID_dictionary
from pydicom.uid import UID

DEFAULT_CONFIG_YAML = """\
listen:
  host: 127.0.0.1
  port: 11112
  ae_title: DEID_GATEWAY
allowed_callers:
  - ae_title: "*"
    hosts: [127.0.0.1]
spool_dir: gateway-data/spool
quarantine_dir: gateway-data/quarantine
key_file: gateway-data/gateway.key
profile: research
destinations:
  - name: archive
    folder: gateway-data/archive
metrics:
  host: 127.0.0.1
  port: 9464
"""
"""The configuration ``serve`` runs without ``--config``: loopback only, every
path under ``gateway-data/`` in the working directory (the audit store is
``gateway-data/audit.sqlite``, beside the spool)."""

#: Storage SOP classes a pathology department sends, accepted unless the
#: configuration lists its own under ``sop_classes``.
PATHOLOGY_SOP_CLASSES: tuple[str, ...] = (
    uids.VLWholeSlideMicroscopyImageStorage,
    uids.VLMicroscopicImageStorage,
    uids.VLSlideCoordinatesMicroscopicImageStorage,
    uids.BasicTextSRStorage,
    uids.EnhancedSRStorage,
    uids.ComprehensiveSRStorage,
    uids.Comprehensive3DSRStorage,
    uids.ExtensibleSRStorage,
    uids.SecondaryCaptureImageStorage,
    uids.MultiFrameTrueColorSecondaryCaptureImageStorage,
    uids.MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    uids.MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    uids.MultiFrameSingleBitSecondaryCaptureImageStorage,
    uids.MicroscopyBulkSimpleAnnotationsStorage,
    uids.SegmentationStorage,
    uids.ParametricMapStorage,
    uids.EncapsulatedPDFStorage,
)

#: Transfer syntaxes the engine passes through unchanged (it rewrites the header
#: and copies the pixel data byte for byte).
PASS_THROUGH_TRANSFER_SYNTAXES: tuple[str, ...] = (
    "1.2.840.10008.1.2.1",  # Explicit VR Little Endian
    "1.2.840.10008.1.2",  # Implicit VR Little Endian
    "1.2.840.10008.1.2.1.99",  # Deflated Explicit VR Little Endian
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless SV1
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
)

#: Keywords of the DICOM UID registry (``VLWholeSlideMicroscopyImageStorage``, ...).
_UID_KEYWORDS: dict[str, str] = {entry[4]: uid for uid, entry in UID_dictionary.items() if entry[4]}
_AE_TITLE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR, no backslash
_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")


class ConfigError(ValueError):
    """The configuration is invalid; the message starts with the offending key."""


@dataclass(frozen=True)
class Listen:
    host: str
    port: int
    ae_title: str
    max_pdu: int


@dataclass(frozen=True)
class TLSServer:
    """TLS for the listening side; ``client_ca_file`` turns on client verification."""

    cert_file: Path
    key_file: Path
    client_ca_file: Path | None


@dataclass(frozen=True)
class TLSClient:
    """TLS towards a destination: verify it with ``ca_file``, optionally present a cert."""

    ca_file: Path
    cert_file: Path | None
    key_file: Path | None


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title (``*`` for any) and the networks it may connect from."""

    ae_title: str
    hosts: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]

    def permits(self, ae_title: str, address: str) -> bool:
        if self.ae_title not in ("*", ae_title.strip()):
            return False
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.hosts)


@dataclass(frozen=True)
class DicomDestination:
    name: str
    ae_title: str
    host: str
    port: int
    tls: TLSClient | None


@dataclass(frozen=True)
class FolderDestination:
    name: str
    folder: Path


Destination = DicomDestination | FolderDestination


@dataclass(frozen=True)
class Route:
    """Where instances from a calling AE (optionally of some SOP classes) go."""

    name: str
    calling_ae_title: str
    sop_classes: frozenset[str] | None
    profile: str
    key_file: Path
    destinations: tuple[str, ...]

    def matches(self, calling_ae_title: str, sop_class_uid: str) -> bool:
        if self.calling_ae_title not in ("*", calling_ae_title.strip()):
            return False
        return self.sop_classes is None or sop_class_uid in self.sop_classes


@dataclass(frozen=True)
class Limits:
    max_associations: int
    max_instance_bytes: int
    min_free_bytes: int


@dataclass(frozen=True)
class Forwarding:
    workers: int
    max_attempts: int
    backoff_initial: float
    backoff_max: float
    #: Seconds between two checks of each destination (C-ECHO, or a write test
    #: for a folder); the result feeds ``destination_up`` and ``/readyz``.
    echo_interval: float
    #: An instance whose data set grows past this many bytes while it arrives
    #: is forwarded while it arrives (:mod:`gateway.cut_through`); 0: never.
    cut_through_bytes: int = 0


@dataclass(frozen=True)
class Metrics:
    host: str
    port: int


@dataclass(frozen=True)
class Config:
    listen: Listen
    tls: TLSServer | None
    allowed_callers: tuple[AllowedCaller, ...]
    sop_classes: tuple[str, ...]
    transfer_syntaxes: tuple[str, ...]
    spool_dir: Path
    quarantine_dir: Path
    key_file: Path
    profile: str
    destinations: tuple[Destination, ...]
    routes: tuple[Route, ...]
    limits: Limits
    forwarding: Forwarding
    metrics: Metrics | None
    #: The audit store: an SQLite file path or a database URL (``postgresql://...``).
    audit_url: str
    #: Where the UID and patient-ID mappings (``id_old,id_new`` CSV) are written;
    #: ``None``: not written.
    mapping_dir: Path | None = None
    #: True for the embedded defaults: the key is then generated on first start.
    generate_key: bool = field(default=False)

    def destination(self, name: str) -> Destination:
        for dest in self.destinations:
            if dest.name == name:
                return dest
        raise KeyError(name)

    def route_for(self, calling_ae_title: str, sop_class_uid: str) -> Route | None:
        """The first route matching the caller and SOP class, or ``None``."""
        for route in self.routes:
            if route.matches(calling_ae_title, sop_class_uid):
                return route
        return None


class _Reader:
    """Typed access to one mapping of the YAML document, with key paths in errors."""

    def __init__(self, data: object, path: str, base: Path) -> None:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{path or '<top level>'}: must be a mapping")
        self.data: Mapping[str, Any] = data
        self.path = path
        self.base = base

    def key(self, name: str) -> str:
        return f"{self.path}.{name}" if self.path else name

    def check_known(self, names: Sequence[str]) -> None:
        unknown = sorted(str(k) for k in self.data if k not in names)
        if unknown:
            raise ConfigError(f"{self.key(unknown[0])}: unknown key")

    def has(self, name: str) -> bool:
        return self.data.get(name) is not None

    def raw(self, name: str) -> Any:
        if name not in self.data or self.data[name] is None:
            raise ConfigError(f"{self.key(name)}: is required")
        return self.data[name]

    def string(self, name: str, default: str | None = None) -> str:
        if not self.has(name) and default is not None:
            return default
        value = self.raw(name)
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{self.key(name)}: must be a non-empty string")
        return value.strip()

    def ae_title(self, name: str, default: str | None = None, wildcard: bool = False) -> str:
        value = self.string(name, default)
        if wildcard and value == "*":
            return value
        if not _AE_TITLE.match(value):
            raise ConfigError(f"{self.key(name)}: must be a DICOM AE title of 1 to 16 characters")
        return value

    def integer(self, name: str, default: int | None, low: int, high: int) -> int:
        if not self.has(name) and default is not None:
            return default
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise ConfigError(f"{self.key(name)}: must be an integer from {low} to {high}")
        return value

    def number(self, name: str, default: float, low: float) -> float:
        if not self.has(name):
            return default
        value = self.raw(name)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < low:
            raise ConfigError(f"{self.key(name)}: must be a number of at least {low}")
        return float(value)

    def size(self, name: str, default: int) -> int:
        """A byte count: an integer or a string such as ``512MiB`` or ``2GB``."""
        if not self.has(name):
            return default
        value = self.raw(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            return value
        if isinstance(value, str):
            match = re.fullmatch(r"\s*(\d+)\s*([KMGT]i?B|B)?\s*", value)
            if match:
                units = {
                    "B": 1,
                    "KB": 10**3,
                    "MB": 10**6,
                    "GB": 10**9,
                    "TB": 10**12,
                    "KiB": 2**10,
                    "MiB": 2**20,
                    "GiB": 2**30,
                    "TiB": 2**40,
                }
                return int(match.group(1)) * units[match.group(2) or "B"]
        raise ConfigError(f"{self.key(name)}: must be a byte count such as 1048576 or '4GiB'")

    def path_value(self, name: str, default: str | None = None) -> Path:
        value = Path(self.string(name, default)).expanduser()
        return value if value.is_absolute() else self.base / value

    def existing_file(self, name: str) -> Path:
        path = self.path_value(name)
        if not path.is_file():
            raise ConfigError(f"{self.key(name)}: file not found")
        return path

    def items(self, name: str) -> list[Any]:
        value = self.raw(name)
        if not isinstance(value, list):
            raise ConfigError(f"{self.key(name)}: must be a list")
        return value

    def child(self, name: str) -> _Reader:
        return _Reader(self.raw(name), self.key(name), self.base)

    def element(self, name: str, index: int, value: object) -> _Reader:
        return _Reader(value, f"{self.key(name)}[{index}]", self.base)


def _uid_list(reader: _Reader, name: str, default: Sequence[str]) -> tuple[str, ...]:
    """A list of UIDs, each given as a dotted UID or a pydicom keyword."""
    if not reader.has(name):
        return tuple(default)
    result: list[str] = []
    for index, value in enumerate(reader.items(name)):
        key = f"{reader.key(name)}[{index}]"
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a UID or a UID keyword")
        uid = value if re.fullmatch(r"[0-9.]+", value) else _UID_KEYWORDS.get(value)
        if uid is None or not UID(uid).is_valid:
            raise ConfigError(f"{key}: {value!r} is not a valid UID or known UID keyword")
        result.append(str(uid))
    if not result:
        raise ConfigError(f"{reader.key(name)}: must not be empty")
    return tuple(result)


def _tls_client(reader: _Reader) -> TLSClient:
    reader.check_known(("ca_file", "cert_file", "key_file"))
    cert = reader.existing_file("cert_file") if reader.has("cert_file") else None
    key = reader.existing_file("key_file") if reader.has("key_file") else None
    if (cert is None) != (key is None):
        raise ConfigError(f"{reader.key('cert_file')}: cert_file and key_file go together")
    return TLSClient(reader.existing_file("ca_file"), cert, key)


def _destination(reader: _Reader) -> Destination:
    name = reader.string("name")
    if not _NAME.match(name):
        raise ConfigError(f"{reader.key('name')}: letters, digits, '_', '.', '-' only")
    if reader.has("folder"):
        reader.check_known(("name", "folder"))
        return FolderDestination(name, reader.path_value("folder"))
    reader.check_known(("name", "ae_title", "host", "port", "tls"))
    tls = _tls_client(reader.child("tls")) if reader.has("tls") else None
    return DicomDestination(
        name=name,
        ae_title=reader.ae_title("ae_title"),
        host=reader.string("host"),
        port=reader.integer("port", None, 1, 65535),
        tls=tls,
    )


def _route(reader: _Reader, index: int, top: _Reader, names: set[str]) -> Route:
    reader.check_known(
        ("name", "calling_ae_title", "sop_classes", "profile", "key_file", "destinations")
    )
    dests: tuple[str, ...]
    if reader.has("destinations"):
        dests = tuple(str(d) for d in reader.items("destinations"))
        for i, dest in enumerate(dests):
            if dest not in names:
                raise ConfigError(f"{reader.key('destinations')}[{i}]: no destination {dest!r}")
        if not dests:
            raise ConfigError(f"{reader.key('destinations')}: must not be empty")
    else:
        dests = tuple(sorted(names))
    return Route(
        name=reader.string("name", f"route-{index}"),
        calling_ae_title=reader.ae_title("calling_ae_title", wildcard=True),
        sop_classes=(
            frozenset(_uid_list(reader, "sop_classes", ())) if reader.has("sop_classes") else None
        ),
        profile=reader.string("profile", top.string("profile")),
        key_file=reader.path_value("key_file")
        if reader.has("key_file")
        else top.path_value("key_file"),
        destinations=dests,
    )


_TOP_KEYS = (
    "listen",
    "tls",
    "allowed_callers",
    "sop_classes",
    "transfer_syntaxes",
    "spool_dir",
    "quarantine_dir",
    "key_file",
    "profile",
    "destinations",
    "routes",
    "limits",
    "forwarding",
    "metrics",
    "audit",
    "mapping_dir",
)

#: Database URL schemes the audit trail can use (through SQLAlchemy).
_AUDIT_SCHEMES = ("sqlite", "postgresql", "postgres")


def _audit_url(top: _Reader, spool_dir: Path) -> str:
    """The audit store: ``audit.url`` (a path or a URL), else ``audit.sqlite`` beside the spool."""
    if not top.has("audit"):
        return str(spool_dir.parent / "audit.sqlite")
    audit = top.child("audit")
    audit.check_known(("url",))
    value = audit.string("url")
    if "://" not in value:
        return str(audit.path_value("url"))
    scheme = value.split("://", 1)[0].split("+", 1)[0].lower()
    if scheme not in _AUDIT_SCHEMES:
        raise ConfigError(f"{audit.key('url')}: must be a file path or a sqlite:// or postgresql:// URL")
    return value


def parse_config(data: object, base: Path, generate_key: bool = False) -> Config:
    """Validate a parsed YAML document; raise :class:`ConfigError` naming the key."""
    top = _Reader(data, "", base)
    top.check_known(_TOP_KEYS)

    listen = top.child("listen")
    listen.check_known(("host", "port", "ae_title", "max_pdu"))
    tls = None
    if top.has("tls"):
        tls_reader = top.child("tls")
        tls_reader.check_known(("cert_file", "key_file", "client_ca_file"))
        tls = TLSServer(
            tls_reader.existing_file("cert_file"),
            tls_reader.existing_file("key_file"),
            (
                tls_reader.existing_file("client_ca_file")
                if tls_reader.has("client_ca_file")
                else None
            ),
        )

    callers: list[AllowedCaller] = []
    for index, item in enumerate(top.items("allowed_callers")):
        caller = top.element("allowed_callers", index, item)
        caller.check_known(("ae_title", "hosts"))
        networks = []
        for i, host in enumerate(caller.items("hosts")):
            try:
                networks.append(ipaddress.ip_network(str(host), strict=False))
            except ValueError:
                raise ConfigError(
                    f"{caller.key('hosts')}[{i}]: {host!r} is not an IP address or network"
                ) from None
        if not networks:
            raise ConfigError(f"{caller.key('hosts')}: must not be empty")
        callers.append(AllowedCaller(caller.ae_title("ae_title", wildcard=True), tuple(networks)))

    destinations: list[Destination] = []
    for index, item in enumerate(top.items("destinations")):
        dest = _destination(top.element("destinations", index, item))
        if any(d.name == dest.name for d in destinations):
            raise ConfigError(f"destinations[{index}].name: duplicate name {dest.name!r}")
        destinations.append(dest)
    if not destinations:
        raise ConfigError("destinations: must not be empty")
    names = {d.name for d in destinations}

    routes = [
        _route(top.element("routes", index, item), index, top, names)
        for index, item in enumerate(top.items("routes") if top.has("routes") else [])
    ]
    if not routes:
        routes = [_route(_Reader({"calling_ae_title": "*"}, "routes[0]", base), 0, top, names)]

    limits = top.child("limits") if top.has("limits") else _Reader({}, "limits", base)
    limits.check_known(("max_associations", "max_instance_bytes", "min_free_bytes"))
    forwarding = (
        top.child("forwarding") if top.has("forwarding") else _Reader({}, "forwarding", base)
    )
    forwarding.check_known(
        ("workers", "max_attempts", "backoff_initial", "backoff_max", "echo_interval",
         "cut_through_bytes")
    )
    metrics = None
    if top.has("metrics"):
        m = top.child("metrics")
        m.check_known(("host", "port"))
        metrics = Metrics(m.string("host", "127.0.0.1"), m.integer("port", None, 0, 65535))

    spool_dir = top.path_value("spool_dir")
    return Config(
        listen=Listen(
            host=listen.string("host", "127.0.0.1"),
            port=listen.integer("port", 11112, 0, 65535),
            ae_title=listen.ae_title("ae_title", "DEID_GATEWAY"),
            max_pdu=listen.integer("max_pdu", 4 * 2**20, 4096, 2**31 - 1),
        ),
        tls=tls,
        allowed_callers=tuple(callers),
        sop_classes=_uid_list(top, "sop_classes", PATHOLOGY_SOP_CLASSES),
        transfer_syntaxes=_uid_list(top, "transfer_syntaxes", PASS_THROUGH_TRANSFER_SYNTAXES),
        spool_dir=spool_dir,
        quarantine_dir=(
            top.path_value("quarantine_dir")
            if top.has("quarantine_dir")
            else spool_dir.parent / "quarantine"
        ),
        key_file=top.path_value("key_file"),
        profile=top.string("profile"),
        destinations=tuple(destinations),
        routes=tuple(routes),
        limits=Limits(
            max_associations=limits.integer("max_associations", 10, 1, 1000),
            max_instance_bytes=limits.size("max_instance_bytes", 8 * 2**30),
            min_free_bytes=limits.size("min_free_bytes", 2**30),
        ),
        forwarding=Forwarding(
            workers=forwarding.integer("workers", 2, 1, 64),
            max_attempts=forwarding.integer("max_attempts", 10, 1, 1000),
            backoff_initial=forwarding.number("backoff_initial", 2.0, 0.01),
            backoff_max=forwarding.number("backoff_max", 600.0, 0.01),
            echo_interval=forwarding.number("echo_interval", 30.0, 0.1),
            cut_through_bytes=forwarding.size("cut_through_bytes", 0),
        ),
        metrics=metrics,
        audit_url=_audit_url(top, spool_dir),
        mapping_dir=top.path_value("mapping_dir") if top.has("mapping_dir") else None,
        generate_key=generate_key,
    )


def load_config(path: Path | None) -> Config:
    """Load and validate ``path``, or the embedded defaults when it is ``None``."""
    if path is None:
        return parse_config(yaml.safe_load(DEFAULT_CONFIG_YAML), Path.cwd(), generate_key=True)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the configuration ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({exc})") from None
    return parse_config(data, path.parent.resolve())
