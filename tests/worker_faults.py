"""Imported by hashing workers in tests (``hash_units(_preload=["worker_faults"])``): the hasher dies or hangs on
files whose names start with exit, segv or slow, and hashes every other file as usual."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from hashdb.codec import hasher

_real_hash = hasher.ModelHasher.hash
_real_hash_with_layers = hasher.ModelHasher.hash_with_layers


def _fault(source: Any) -> None:
    name = os.path.basename(str(source))
    if name.startswith("exit"):
        os._exit(3)
    if name.startswith("segv"):
        os.kill(os.getpid(), signal.SIGSEGV)
    if name.startswith("slow"):
        time.sleep(60)


def _faulty_hash(self: Any, source: Any) -> bytes:
    _fault(source)
    return _real_hash(self, source)


def _faulty_hash_with_layers(self: Any, source: Any) -> tuple[bytes, list[tuple[str, bytes]]]:
    _fault(source)  # the workers hash with layers: the fault must be where they call
    return _real_hash_with_layers(self, source)


hasher.ModelHasher.hash = _faulty_hash  # type: ignore[method-assign]
hasher.ModelHasher.hash_with_layers = _faulty_hash_with_layers  # type: ignore[method-assign]
