"""The LMDB environment: opening (and creating, owner-only by default), transactions, and map growth.

This module knows LMDB and the file system, nothing of hashdb's tables. Every ``lmdb.Error`` that reaches
it leaves as a ``StorageError`` in hashdb's words; a failed commit changes nothing on disk (LMDB never
overwrites live pages without writemap), so a write that failed for lack of space can simply be retried
once there is room again.
"""

from __future__ import annotations

import os
import stat
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeAlias, TypeVar

import lmdb

from ..errors import DatabaseNotFound, InvalidArgument, NotADatabase, StorageError

DEFAULT_MAP_SIZE = 1 << 30  # only address space: the file grows with the data, the map doubles when full
MAX_MAP_SIZE = 1 << 44
MAX_DBS = 16  # the model tables and the layer tables (schema.py)
DATA_FILE = "data.mdb"
LOCK_FILE = "lock.mdb"
# New databases are private to their owner: they hold keys and metadata. mode=0o770 (say) shares a group.
DEFAULT_MODE = 0o700
GROW_ATTEMPTS = 64  # bounds the MapFullError -> grow -> rerun loop even if growth never makes room

T = TypeVar("T")
# An lmdb.Transaction. Typed as Any: lmdb's stubs type every value as bytes | memoryview, true only of
# buffers=True transactions, which the store never opens (its values are bytes).
Txn: TypeAlias = Any


class RWLock:
    """Many shared holders or one exclusive holder; a waiting exclusive request blocks new shared ones.

    Not reentrant: a thread must not take the shared side twice (an exclusive waiter in between would
    deadlock it).
    """

    def __init__(self) -> None:
        self._cond = threading.Condition(threading.Lock())
        self._shared = 0
        self._exclusive = False
        self._waiting = 0

    @contextmanager
    def shared(self) -> Iterator[None]:
        with self._cond:
            while self._exclusive or self._waiting:
                self._cond.wait()
            self._shared += 1
        try:
            yield
        finally:
            with self._cond:
                self._shared -= 1
                if not self._shared:
                    self._cond.notify_all()

    @contextmanager
    def exclusive(self) -> Iterator[None]:
        with self._cond:
            self._waiting += 1
            try:
                while self._exclusive or self._shared:
                    self._cond.wait()
            finally:
                self._waiting -= 1
            self._exclusive = True
        try:
            yield
        finally:
            with self._cond:
                self._exclusive = False
                self._cond.notify_all()


def file_identity(path: str) -> tuple[int, int] | None:
    """(device, inode) of the database file, to notice a directory deleted and created anew."""
    try:
        st = os.stat(os.path.join(path, DATA_FILE))
    except OSError:
        return None
    return st.st_dev, st.st_ino


def check_mode(mode: object) -> int:
    """A directory mode for new databases: owner rwx at least, no bits beyond 0o777."""
    if isinstance(mode, bool) or not isinstance(mode, int) or mode & ~0o777 or mode & 0o700 != 0o700:
        raise InvalidArgument(f"mode must be a directory mode like 0o700 or 0o770 (owner rwx), got {mode!r}")
    return mode


def check_path(path: object) -> str:
    """``path`` as a str, or InvalidArgument."""
    try:
        text = os.fspath(path)  # type: ignore[call-overload]
    except TypeError:
        raise InvalidArgument(f"path must be a str or os.PathLike, got {type(path).__name__}") from None
    if not isinstance(text, str):
        raise InvalidArgument(f"path must be a str or os.PathLike of str, got {type(text).__name__}")
    if not text or "\0" in text:
        raise InvalidArgument(f"path must be a non-empty str without NUL characters, got {text!r}")
    return text


def describe_lmdb_error(e: lmdb.Error) -> str:
    """One line on what an LMDB failure most likely means for the user."""
    text = str(e)
    # LMDB reports a failed page write (ENOSPC included) as EIO; EFBIG is a file size limit (ulimit -f).
    if isinstance(e, lmdb.DiskError) or any(
        s in text for s in ("No space left", "Input/output error", "File too large", "Disk quota")
    ):
        return f"the disk is full or failing ({text})"
    if isinstance(e, lmdb.ReadonlyError) or "Permission denied" in text or "Read-only" in text:
        return f"no permission to write ({text})"
    return text


class Environment:
    """An open LMDB environment (one directory). Thread-safe; every call runs its own transaction.

    ``read()`` and ``write()`` are the only ways in: a writer's MapFullError grows the map (between
    transactions, none of this process active) and reruns the transaction body; another process's growth
    is adopted on MapResizedError. A read-only environment takes no write transaction, ever.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        readonly: bool = False,
        create: bool = True,
        map_size: int | None = None,
        durable: bool = True,
        mode: int = DEFAULT_MODE,
        why_not_created: str = "create=False was given",
    ) -> None:
        self.path = check_path(path)
        self.durable = durable
        self.readonly = readonly
        if map_size is not None and (isinstance(map_size, bool) or not isinstance(map_size, int) or map_size < 1):
            raise InvalidArgument(f"map_size must be a positive int, got {map_size!r}")
        mode = check_mode(mode)
        self.data_path = os.path.join(self.path, DATA_FILE)
        if os.path.exists(self.path) and not os.path.isdir(self.path):
            raise NotADatabase(f"{self.path!r} exists and is not a directory, so it is not a hashdb database")
        self.created = not os.path.exists(self.data_path)
        if self.created and (readonly or not create):
            why = "it was opened read-only" if readonly else why_not_created
            raise DatabaseNotFound(f"no hashdb database at {self.path!r}, and {why}")
        if self.created:
            self.dir_mode = mode
            self._make_directory(mode)
        else:
            self.dir_mode = stat.S_IMODE(os.stat(self.path).st_mode)
        # Files get the directory's read/write bits (0o700 -> 0o600); a lock file LMDB has to recreate
        # for an existing database follows its data file.
        self.file_mode = mode & 0o666 if self.created else stat.S_IMODE(os.stat(self.data_path).st_mode)
        self._env_lock = RWLock()
        self._map_lock = threading.Lock()
        try:
            self.env = lmdb.open(
                self.path,
                map_size=map_size or DEFAULT_MAP_SIZE,
                max_dbs=MAX_DBS,
                subdir=True,
                readonly=readonly,
                create=not readonly,
                readahead=False,
                mode=self.file_mode,
                # durable=False skips the fsync per commit: a crash may lose the newest transactions, but
                # without writemap LMDB never corrupts the file.
                sync=durable,
                metasync=durable,
            )
        except lmdb.Error as e:
            raise StorageError(f"cannot open the LMDB environment at {self.path!r}: {describe_lmdb_error(e)}") from e
        if self.created:
            self._fix_file_modes()
        self.closed = False
        try:
            self.page_size = int(self.env.stat()["psize"])
        except lmdb.Error as e:
            self.env.close()
            self.closed = True
            raise StorageError(f"cannot read the LMDB environment at {self.path!r}: {e}") from e
        # Free reader slots left by crashed processes; while held they keep LMDB from reusing pages.
        try:
            self.env.reader_check()
        except lmdb.Error:
            pass  # e.g. a lock file we may not write: only space reuse suffers
        self.identity = file_identity(self.path)

    def _make_directory(self, mode: int) -> None:
        fresh = not os.path.exists(self.path)
        try:
            os.makedirs(self.path, mode=mode, exist_ok=True)
            if fresh:
                os.chmod(self.path, mode)  # the exact mode asked for, whatever the umask
        except OSError as e:
            raise StorageError(f"cannot create the database directory {self.path!r}: {e}") from e
        if not fresh:  # an existing (empty) folder keeps its own mode; only our files are made private
            self.dir_mode = stat.S_IMODE(os.stat(self.path).st_mode)

    def _fix_file_modes(self) -> None:
        """LMDB applies the umask to the files it creates; give them exactly file_mode."""
        for name in (DATA_FILE, LOCK_FILE):
            try:
                os.chmod(os.path.join(self.path, name), self.file_mode)
            except OSError:
                pass  # e.g. a lock file owned by someone else: it holds no data

    def close(self) -> None:
        with self._env_lock.exclusive():
            if not self.closed:
                self.closed = True
                self.env.close()

    # ------------------------------------------------------------------------------------ transactions

    def _check_open(self) -> None:
        if self.closed:
            raise StorageError(f"database {self.path!r} is closed")

    @contextmanager
    def read(self) -> Iterator[Txn]:
        """A read transaction; adopts a map size another process grew."""
        for _ in range(8):
            with self._env_lock.shared():
                self._check_open()
                try:
                    txn = self.env.begin(buffers=False)
                except lmdb.MapResizedError:
                    txn = None
                except lmdb.Error as e:
                    raise StorageError(f"cannot read {self.path!r}: {describe_lmdb_error(e)}") from e
                if txn is not None:
                    try:
                        with txn:
                            yield txn
                    except lmdb.Error as e:
                        raise StorageError(f"cannot read {self.path!r}: {describe_lmdb_error(e)}") from e
                    return
            self._adopt_map_size()
        raise StorageError("the LMDB map keeps being resized by another process")

    def write(self, body: Callable[[Txn], T], reserve: int = 0) -> T:
        """Run ``body`` in one write transaction and commit; on MapFullError grow the map and rerun it.

        ``body`` must derive everything it writes from the transaction and its own arguments, so that a
        rerun after an abort is the same transaction again. ``reserve`` is an estimate of the bytes it
        adds, used to grow the map once up front rather than by repeated failures. Any failure (a full
        disk included) aborts the whole transaction and raises a HashDBError; nothing of it is stored.
        """
        if self.readonly:
            raise StorageError(f"database {self.path!r} is open read-only")
        self._check_open()
        if reserve:
            self._ensure_room(reserve)
        for _ in range(GROW_ATTEMPTS):
            grow = False
            with self._env_lock.shared():
                self._check_open()
                try:
                    with self.env.begin(write=True) as txn:
                        return body(txn)
                except lmdb.MapFullError:
                    grow = True
                except lmdb.MapResizedError:
                    pass
                except lmdb.Error as e:
                    raise StorageError(
                        f"could not write to {self.path!r}: {describe_lmdb_error(e)}; nothing of this write was stored"
                    ) from e
            if grow:
                self._grow_map()
            else:
                self._adopt_map_size()
        raise StorageError("could not commit the write: the LMDB map could not grow enough")

    def map_size(self) -> int:
        with self._env_lock.shared():  # env.info() must not race set_mapsize in another thread
            self._check_open()
            return int(self.env.info()["map_size"])

    def used_bytes(self) -> int:
        with self._env_lock.shared():
            self._check_open()
            return (int(self.env.info()["last_pgno"]) + 1) * self.page_size

    def _ensure_room(self, reserve: int) -> None:
        # Twice the estimate: LMDB keeps the previous version of every touched page until commit.
        need = self.used_bytes() + 2 * reserve
        if need > self.map_size():
            self._grow_map(need)

    def _grow_map(self, at_least: int = 0) -> None:
        with self._map_lock:
            current = self.map_size()
            target = max(2 * current, at_least)
            if target > MAX_MAP_SIZE:
                raise StorageError(f"the database needs a map larger than {MAX_MAP_SIZE} bytes")
            with self._env_lock.exclusive():
                self._check_open()
                if int(self.env.info()["map_size"]) == current:  # another thread may have grown it meanwhile
                    try:
                        self.env.set_mapsize(target)
                    except lmdb.Error as e:
                        raise StorageError(f"cannot grow the map of {self.path!r}: {describe_lmdb_error(e)}") from e

    def _adopt_map_size(self) -> None:
        with self._env_lock.exclusive():
            self._check_open()
            try:
                self.env.set_mapsize(0)  # 0 = take the size another process recorded
            except lmdb.Error as e:
                raise StorageError(f"cannot adopt the map size of {self.path!r}: {describe_lmdb_error(e)}") from e


__all__ = [
    "DEFAULT_MAP_SIZE",
    "DEFAULT_MODE",
    "MAX_MAP_SIZE",
    "Environment",
    "RWLock",
    "Txn",
    "file_identity",
]
