"""The durable on-disk queue between receipt and forwarding.

Layout under ``spool_dir``::

    incoming/        files and entry directories being received or made durable;
                     emptied at start-up
    ready/<id>/      one directory per acknowledged instance:
        instance.dcm     the instance as received (Part 10)
        entry.json       how it arrived (caller, SOP class, route); never changes
        state.json       attempts and destinations already served, once there are
                         any (absent: none); replaced atomically
    done/<id>/       entries being deleted; emptied at start-up
    free/<id>/       delivered entries kept for reuse, their instance emptied;
                     emptied at start-up
    work/            de-identified output on its way out; emptied at start-up

``.lock`` is held (``flock``) by the gateway using the spool and by its
receiving process: a second gateway configured on the same spool, or one
restarted while a process of the previous one still lives, waits for it
rather than recovering a spool that is still being written.

An entry becomes visible in ``ready/`` by one ``rename`` of a directory whose
files were fsynced, followed by an fsync of ``ready/``: after a crash an entry
is either complete or absent, and only then is the sender answered Success.
Entry ids are random, never derived from the data, so they can be logged.

Entries are recycled. Creating a file or a directory allocates an inode, and
on ext4 without a journal that means scanning past every inode deleted in
the last minutes: a stream of small instances, each a directory and two
files created and later deleted, spent about a third of the receiving
thread's CPU there. So a delivered entry, its instance truncated to nothing,
is moved to ``free/`` (up to :data:`FREE_SLOTS` of them), and the receiver
takes one from there (:meth:`Spool.slot`) to receive the next instance into,
overwriting its files: an instance then costs renames and no new inode.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import stat
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

INSTANCE = "instance.dcm"
ENTRY = "entry.json"
STATE = "state.json"
LOCK = ".lock"

#: Delivered entry directories kept in ``free/`` for reuse (see the module).
FREE_SLOTS = 32


#: How long :meth:`Spool.open` waits for the spool's lock.
LOCK_WAIT_SECONDS = 30.0


class SpoolLockedError(OSError):
    """Another process holds the spool (see the module documentation)."""


class SpoolFullError(OSError):
    """The spool cannot take the instance (disk full or below the free-space floor)."""


@dataclass(frozen=True)
class EntryInfo:
    """How an instance arrived. Holds no value from the data set except its SOP class."""

    calling_ae_title: str
    sop_class_uid: str
    transfer_syntax_uid: str
    route: str
    size: int
    received: str = field(default_factory=lambda: datetime.now(UTC).isoformat())
    #: The receiving association's number, so that forwarder log lines can name it.
    assoc_id: int = 0


@dataclass
class EntryState:
    """Forwarding progress, rewritten atomically after each attempt."""

    attempts: int = 0
    delivered: list[str] = field(default_factory=list)
    last_error: str | None = None


def fsync_dir(path: Path) -> None:
    """Make a rename or unlink inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: object) -> None:
    """Write ``data`` beside ``path``, fsync it, and rename it over ``path``.

    The file is owner-only whatever the umask, like everything in the spool
    and the quarantine.
    """
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # left by a crash, perhaps with another mode
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600), "w", encoding="utf-8") as fh:
        json.dump(data, fh)
        fh.flush()
        os.fsync(fh.fileno())
    tmp.replace(path)
    fsync_dir(path.parent)


def write_json_unseen(path: Path, data: object) -> None:
    """Write ``data`` to an owner-only file and fsync it, overwriting the file
    if it is there. Its directory is not yet visible, so no temporary name
    is needed, and a file left by a recycled entry is reused as it is."""
    payload = json.dumps(data).encode("utf-8")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view) :]
        os.fsync(fd)
    finally:
        os.close(fd)


def read_state(entry: Path) -> EntryState:
    """The state of the entry in directory ``entry``; a new entry has none yet."""
    with contextlib.suppress(FileNotFoundError):
        return EntryState(**json.loads((entry / STATE).read_text(encoding="utf-8")))
    return EntryState()


def move(src: Path, dst: Path) -> None:
    """Move ``src`` to ``dst``; copy when across file systems. Not yet durable."""
    try:
        src.replace(dst)
    except OSError as exc:
        if exc.errno != errno.EXDEV:
            raise
        shutil.copyfile(src, dst)
        src.unlink()


#: Flushes an entry's instance while its entry file is written and flushed:
#: the two fsyncs overlap (a journaling file system commits them together).
_flushing = ThreadPoolExecutor(max_workers=4, thread_name_prefix="spool-fsync")


class Spool:
    """The queue of acknowledged instances waiting to be forwarded."""

    def __init__(self, root: Path, min_free_bytes: int = 0) -> None:
        self.root = root
        self.incoming = root / "incoming"
        self.ready = root / "ready"
        self.done = root / "done"
        self.free = root / "free"
        self.work = root / "work"
        self.min_free_bytes = min_free_bytes
        self._lock = threading.Lock()
        #: Names in ``free/`` not yet taken by :meth:`slot`, from its last listing.
        self._free_names: list[str] = []
        self._lock_fd: int | None = None

    @property
    def lock_fd(self) -> int | None:
        """The descriptor holding the spool's lock, for a child process to inherit."""
        return self._lock_fd

    def _take_lock(self, wait: float) -> None:
        fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    os.close(fd)
                    raise SpoolLockedError(
                        errno.EBUSY, "the spool is in use by another gateway process"
                    ) from None
                time.sleep(0.05)
                continue
            self._lock_fd = fd
            return

    def close(self) -> None:
        """Release the spool's lock (processes that inherited it still hold it)."""
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def open(self, wait: float = LOCK_WAIT_SECONDS) -> list[str]:
        """Lock the spool, create the layout, drop what was never acknowledged;
        return pending ids, oldest first.

        Anything in ``incoming/`` was never answered Success, anything in
        ``done/`` was already delivered everywhere, ``free/`` holds entries
        kept for reuse only (a crash may have left one's instance untruncated)
        and ``work/`` is re-made from the spool, so all four are emptied. Raises
        :class:`SpoolLockedError` when another process holds the spool for
        longer than ``wait`` seconds.
        """
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        if self._lock_fd is None:
            self._take_lock(wait)
        for directory in (self.root, self.incoming, self.ready, self.done, self.free, self.work):
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            directory.chmod(0o700)
        for directory in (self.incoming, self.done, self.free, self.work):
            for child in directory.iterdir():
                if child.is_dir() and not child.is_symlink():
                    shutil.rmtree(child)
                else:
                    child.unlink()
        pending = []
        for child in self.ready.iterdir():
            if (child / INSTANCE).is_file() and (child / ENTRY).is_file():
                pending.append((child.stat().st_mtime_ns, child.name))
            else:  # a directory not created by admit(): never acknowledged
                shutil.rmtree(child)
        return [name for _, name in sorted(pending)]

    def free_bytes(self) -> int:
        usage = shutil.disk_usage(self.root)
        return usage.free

    def has_room(self, size: int = 0) -> bool:
        return self.free_bytes() - size >= self.min_free_bytes

    def slot(self) -> Path:
        """A new directory in ``incoming/`` to receive an instance into, as
        :data:`INSTANCE`; :meth:`admit` makes it an entry where it is.

        It is a delivered entry from ``free/`` when there is one (its files
        are overwritten), else a new directory. Thread-safe, and only the
        receiving process takes from ``free/``.
        """
        target = self.incoming / uuid.uuid4().hex
        for _ in range(FREE_SLOTS + 1):  # bounded, whatever fails
            with self._lock:
                if not self._free_names:
                    with contextlib.suppress(OSError):
                        self._free_names = [path.name for path in self.free.iterdir()]
                name = self._free_names.pop() if self._free_names else None
            if name is None:
                break
            with contextlib.suppress(OSError):  # taken meanwhile, or not one to take
                (self.free / name).rename(target)
                if stat.S_ISDIR(target.lstat().st_mode):
                    return target
                target.unlink()  # not an entry's directory (nor a link to one)
        target.mkdir(mode=0o700)
        return target

    def admit(self, received: Path, info: EntryInfo) -> str:
        """Make ``received`` durable as a new entry and return its id.

        ``received`` is either the :data:`INSTANCE` of a :meth:`slot`, which
        becomes the entry, or a file that is moved into a new one (not
        copied when on the same file system). On any failure nothing of the
        entry is left behind; disk full raises :class:`SpoolFullError`.
        """
        # Room is kept for one more copy of the instance (two when it is not
        # on this disk yet): the forwarder writes the de-identified output on
        # the spool's disk, and a spool filled to the last byte could never
        # drain (the output would not fit and would be retried for ever).
        in_slot = received.name == INSTANCE and received.parent.parent == self.incoming
        on_disk = in_slot or received.parent == self.incoming
        if not self.has_room(info.size * (1 if on_disk else 2)):
            received.unlink(missing_ok=True)
            raise SpoolFullError(errno.ENOSPC, "spool below its free-space floor")
        staging = received.parent if in_slot else self.incoming / uuid.uuid4().hex
        entry_id = staging.name
        try:
            if not in_slot:
                staging.mkdir(mode=0o700)
                move(received, staging / INSTANCE)
            flushed = _flushing.submit(fsync_file, staging / INSTANCE)
            try:
                write_json_unseen(staging / ENTRY, vars(info))  # flat: no deep copy needed
            finally:
                flushed.result()  # raises what the fsync raised
            fsync_dir(staging)
            staging.rename(self.ready / entry_id)
            fsync_dir(self.ready)
        except OSError as exc:
            shutil.rmtree(staging, ignore_errors=True)
            received.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFullError(exc.errno, "spool disk full") from None
            raise
        return entry_id

    def path(self, entry_id: str) -> Path:
        return self.ready / entry_id

    def instance(self, entry_id: str) -> Path:
        return self.ready / entry_id / INSTANCE

    def info(self, entry_id: str) -> EntryInfo:
        data = json.loads((self.ready / entry_id / ENTRY).read_text(encoding="utf-8"))
        return EntryInfo(**data)

    def state(self, entry_id: str) -> EntryState:
        return read_state(self.ready / entry_id)

    def save_state(self, entry_id: str, state: EntryState) -> None:
        write_json_atomic(self.ready / entry_id / STATE, asdict(state))

    def remove(self, entry_id: str) -> None:
        """Delete an entry: one atomic rename out of ``ready/``, then its
        instance is emptied and the directory kept in ``free/`` for reuse,
        or, with enough kept, the files deleted."""
        target = self.done / entry_id
        (self.ready / entry_id).rename(target)
        fsync_dir(self.ready)
        try:  # an entry holds files only
            if sum(1 for _ in self.free.iterdir()) < FREE_SLOTS:
                for child in target.iterdir():
                    if child.name == INSTANCE:
                        os.truncate(child, 0)
                    elif child.name != ENTRY:
                        child.unlink()
                target.rename(self.free / entry_id)
                return
            for child in target.iterdir():
                child.unlink()
            target.rmdir()
        except OSError:
            shutil.rmtree(target)

    def pending(self) -> list[str]:
        return sorted(child.name for child in self.ready.iterdir())
