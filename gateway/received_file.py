"""The file a C-STORE data set is received into.

pynetdicom writes from its reactor thread: a failed write (disk full) would
raise there and abort the association with no status at all. Here the first
error is kept and the C-STORE handler answers for it. The file is flushed to
disk while it arrives, so that the flush before the acknowledgement waits
for the last part only.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from tempfile import NamedTemporaryFile
from typing import IO, cast


class ReceivedFile:
    """The file pynetdicom streams a received data set into, in ``incoming``.

    pynetdicom writes from its reactor thread: a failed write (disk full)
    would raise there and abort the association with no status at all. Here
    the first error is kept, the file is emptied to give the space back and
    later writes are dropped, so the C-STORE handler can answer 0xA700.

    Every :data:`WRITEBACK_STEP` bytes the kernel is asked to start writing
    what came so far to disk (``sync_file_range``), and, unless one is still
    running, an ``fdatasync`` of the file starts in a helper thread: with
    the pages written but not flushed, the fsync of a 1 GB instance still
    took about a second after its last byte (a disk, or a virtual machine's
    host, can hold written data in a cache of its own until told to flush).
    So the fsync before the instance is acknowledged waits for the last step
    only. The C-STORE handler starts the writeback of the rest and collects
    the helper's outcome (:meth:`finish_writeback`) before it checks the
    instance: a failed flush fails the instance, since a later fsync through
    another descriptor need not report it again.
    """

    def __init__(self, incoming: Path, *, delete: bool, mode: str, suffix: str) -> None:
        """A new file in ``incoming`` (pynetdicom's ``NamedTemporaryFile`` call)."""
        temporary = NamedTemporaryFile(  # noqa: SIM115 - closed by pynetdicom through close()
            dir=incoming, prefix="recv-", delete=delete, mode=mode, suffix=suffix
        )
        # Written through the file object itself: the wrapper's attribute
        # lookup costs more than the write of a PDU's data.
        self._start(temporary.name, temporary, temporary.file, None)

    @classmethod
    def in_directory(cls, directory: Path, name: str) -> ReceivedFile:
        """The file ``name`` in ``directory``, emptied if it is there, which
        belongs to it: :meth:`delete` deletes the directory too (unless it
        was moved meanwhile)."""
        path = directory / name
        raw = os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb")
        received = cls.__new__(cls)
        received._start(str(path), raw, raw, directory)
        return received

    def _start(self, name: str, file: IO[bytes], raw: IO[bytes], directory: Path | None) -> None:
        self.name = name
        self._file = file
        self._raw = raw
        self._directory = directory
        self._written = 0
        self._flushed = 0
        #: The flush running in a helper thread, if any.
        self._flushing: Future[None] | None = None
        self.error: OSError | None = None

    @property
    def written(self) -> int:
        """Bytes written so far."""
        return self._written

    @property
    def file(self) -> ReceivedFile:
        """pynetdicom flushes through ``.file``, as on a NamedTemporaryFile."""
        return self

    def write(self, data: bytes | memoryview) -> int:
        if self.error is None:
            try:
                count = self._raw.write(data)
                self._written += count
                if self._written - self._flushed >= WRITEBACK_STEP:
                    self._start_writeback()
                return count
            except OSError as exc:
                self._fail(exc)
        return len(data)

    def finish_writeback(self) -> None:
        """Start writing what is not on its way to disk yet (the data set is
        complete) and wait for the helper's flush; its failure is the file's."""
        try:
            if self.error is None and self._written > self._flushed:
                self._start_writeback(flush=False)
            if self._flushing is not None:
                self._flushing.result()
        except OSError as exc:
            self._fail(exc)
        finally:
            self._flushing = None

    def _start_writeback(self, *, flush: bool = True) -> None:
        self._raw.flush()
        fd = self._raw.fileno()
        if _sync_file_range is not None:
            # Starts the writes and returns; a full device queue slows the
            # receipt down to the disk's pace, which the fsync would anyway.
            _sync_file_range(fd, self._flushed, self._written - self._flushed, _SYNC_FILE_RANGE_WRITE)
        self._flushed = self._written
        if flush and (self._flushing is None or self._flushing.done()):
            if self._flushing is not None:
                self._flushing.result()  # a failed flush raises here
            # A descriptor of its own: the file may be closed meanwhile.
            self._flushing = _flushes.submit(_flush_and_close, os.dup(fd))

    def flush(self) -> None:
        if self.error is None:
            try:
                self._raw.flush()
            except OSError as exc:
                self._fail(exc)

    def _fail(self, exc: OSError) -> None:
        self.error = exc
        with contextlib.suppress(OSError):
            os.ftruncate(self._file.fileno(), 0)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a flush of data that could not be written
            self._file.close()

    def delete(self) -> None:
        """Close the file and delete what is left of it: the file, unless it
        was moved, and its directory, unless that was moved."""
        self.close()
        with contextlib.suppress(OSError):
            Path(self.name).unlink(missing_ok=True)
        if self._directory is not None:
            shutil.rmtree(self._directory, ignore_errors=True)


#: How much of a received data set is written before its writeback to disk starts.
WRITEBACK_STEP = 16 * 1024 * 1024
_SYNC_FILE_RANGE_WRITE = 2
#: Runs the flushes of received files (see :class:`ReceivedFile`).
_flushes = ThreadPoolExecutor(max_workers=4, thread_name_prefix="receive-flush")


def _flush_and_close(fd: int) -> None:
    try:
        os.fdatasync(fd)
    finally:
        os.close(fd)


def _libc_sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """``sync_file_range(2)`` from the C library (Linux), or None."""
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
    function.restype = ctypes.c_int
    return cast(Callable[[int, int, int, int], int], function)


_sync_file_range = _libc_sync_file_range()
