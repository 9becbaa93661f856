"""The network node: spool, quarantine, forwarder and receiver wired together.

Start-up order matters for durability: the spool is recovered and every
pending entry handed to the forwarder before the receiver accepts the first
association, so work acknowledged before a crash is resumed first.

The receiver runs in a child process (:mod:`gateway.receive_process`) so that
acknowledging instances never waits on de-identification; everything else
runs here.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Mapping
from functools import partial

from structlog.typing import FilteringBoundLogger

from gateway import __version__, metrics
from gateway.audit import AuditTrail
from gateway.config import Config, ConfigError, FolderDestination
from gateway.deid.engine import Deidentifier
from gateway.deid.keys import KeyLoadError, generate_key_file, load_key
from gateway.deid.profile import ProfileError, load_profile
from gateway.forward import Engine, Forwarder, open_folder
from gateway.health import HealthServer, writable_directory_check
from gateway.logs import get_logger
from gateway.monitor import DestinationMonitor
from gateway.quarantine import Quarantine
from gateway.receive import configure_pynetdicom
from gateway.receive_process import ReceiverProcess
from gateway.spool import INSTANCE, Spool


def _log() -> FilteringBoundLogger:
    """A logger built per call, so it follows the configuration made at start-up."""
    return get_logger(logger=__name__)


def build_engines(config: Config) -> dict[str, Engine]:
    """One compiled engine per route; errors name the configuration key."""
    if config.generate_key and not config.key_file.exists():
        generate_key_file(config.key_file)
        _log().info("key.generated")
    engines: dict[str, Engine] = {}
    for index, route in enumerate(config.routes):
        try:
            profile = load_profile(route.profile)
        except (ProfileError, OSError) as exc:
            raise ConfigError(f"routes[{index}].profile: {exc}") from None
        try:
            key = load_key(route.key_file)
        except KeyLoadError as exc:
            raise ConfigError(f"routes[{index}].key_file: {exc}") from None
        engines[route.name] = Deidentifier(profile, key)
    return engines


class Node:
    """A running gateway. ``start`` returns the bound DICOM address."""

    def __init__(self, config: Config, engines: Mapping[str, Engine] | None = None) -> None:
        self.config = config
        self.engines = dict(engines) if engines is not None else build_engines(config)
        self.spool = Spool(config.spool_dir, config.limits.min_free_bytes)
        self.quarantine = Quarantine(config.quarantine_dir)
        self.audit: AuditTrail | None = None
        self.forwarder: Forwarder | None = None
        self.receiver: ReceiverProcess | None = None
        self.monitor: DestinationMonitor | None = None
        self.health: HealthServer | None = None
        self.address: tuple[str, int] | None = None

    def _oldest_age(self) -> float:
        """Age of the oldest spooled instance, from the time its file was received.

        Entries leave while this runs (it is called at scrape time), so a
        vanished one is skipped rather than failing the scrape.
        """
        now = time.time()
        oldest = now
        for entry in self.spool.ready.iterdir():
            with contextlib.suppress(FileNotFoundError):
                oldest = min(oldest, (entry / INSTANCE).stat().st_mtime)
        return max(now - oldest, 0.0)

    def _ready_checks(self, health: HealthServer, monitor: DestinationMonitor) -> None:
        """``/readyz``: listening, spool writable, keys loaded, every destination up."""
        health.add_check("listening", lambda: self.receiver is not None and self.receiver.listening)
        health.add_check("spool-writable", writable_directory_check(self.spool.root))
        health.add_check("key-loaded", lambda: len(self.engines) == len(self.config.routes))
        for dest in self.config.destinations:
            health.add_check(f"destination:{dest.name.lower()}", partial(monitor.is_up, dest.name))

    def start(self) -> tuple[str, int]:
        pending = self.spool.open()
        self.quarantine.open()
        for dest in self.config.destinations:
            if isinstance(dest, FolderDestination):
                open_folder(dest)
        self.audit = AuditTrail(self.config.audit_url)
        self.forwarder = Forwarder(self.config, self.spool, self.quarantine, self.engines, self.audit)
        self.receiver = ReceiverProcess(
            self.config, self.forwarder.submit, self.spool.lock_fd, self.forwarder.cut_through
        )
        configure_pynetdicom()
        metrics.set_build_info(
            __version__,
            {engine.profile.name: engine.profile.content_hash for engine in self.engines.values()},
        )
        metrics.register_destinations(d.name for d in self.config.destinations)
        metrics.watch_spool(lambda: float(len(self.spool.pending())), self._oldest_age)
        metrics.watch_quarantine(lambda: float(len(self.quarantine.ids())))
        self.monitor = DestinationMonitor(
            (d.name for d in self.config.destinations),
            self.forwarder.check_destination,
            self.config.forwarding.echo_interval,
        )
        if self.config.metrics is not None:
            self.health = HealthServer(self.config.metrics.host, self.config.metrics.port)
            self._ready_checks(self.health, self.monitor)
            self.health.start()
        self.forwarder.start(pending)
        self.monitor.start()
        self.address = self.receiver.start()
        metrics.watch_receiver_process(lambda: self.receiver.pid if self.receiver is not None else None)
        _log().info(
            "node.started",
            version=__version__,
            host=self.address[0],
            port=self.address[1],
            recovered=len(pending),
        )
        return self.address

    def stop(self) -> None:
        """Stop accepting, let workers finish their current instance, close peers."""
        if self.receiver is not None:
            self.receiver.stop()
        if self.monitor is not None:
            self.monitor.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.audit is not None:
            self.audit.close()
        if self.health is not None:
            self.health.stop()
            self.health = None
        self.spool.close()
        _log().info("node.stopped")

    def idle(self) -> bool:
        """True when nothing is waiting in the spool."""
        return not self.spool.pending()
