"""MemoryIndex: the shell HashDB talks to. Argument checking and bookkeeping only; kernels live elsewhere."""

from __future__ import annotations

import sys
from typing import Any, cast

import numpy as np

from ..codes import check_bits
from ..errors import InvalidArgument, shown
from .base import CodeMatrix, Result, Structure
from .bits import last_occurrences
from .bktree import BKTree
from .contract import check_force
from .mih import MIH
from .planner import choose
from .scan import Scan

_noticed = False


def compile_notice() -> None:
    """Once per process: say on a terminal that the kernels are being compiled when numba's cache (written
    once per install, beside the modules or in the user's cache) does not hold them yet; it takes 20-30 s
    of a 2-core machine, which must not look like a hang."""
    global _noticed
    if _noticed:
        return
    _noticed = True
    try:
        if not sys.stderr.isatty():
            return
        from .mih import mih_radius

        cold = not mih_radius._cache._cache_file._load_index()  # numba's own check of its index file
    except Exception:  # noqa: BLE001 - a private numba API: no notice rather than a failure
        return
    if cold:
        print("compiling search kernels, once", file=sys.stderr, flush=True)


class MemoryIndex:
    """Exact Hamming radius and k-NN over codes keyed by dense integer ids (contract.InMemoryIndex)."""

    engine = "kernels"

    def __init__(self, bits: int) -> None:
        compile_notice()
        self.bits = check_bits(bits)
        self.words = self.bits // 64
        self.matrix = CodeMatrix(self.bits)
        self.scan = Scan(self.matrix)
        self.mih = MIH(self.matrix)
        self.bktree = BKTree(self.matrix)
        self.structures: dict[str, Structure] = {"scan": self.scan, "mih": self.mih, "bktree": self.bktree}
        self._version = 0
        self._plans: dict[int, str] = {}
        self._plans_key: tuple[int, int] = (-1, -1)

    # ---- contents -------------------------------------------------------------------------------------
    def _check_ids(self, ids: Any) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise InvalidArgument(f"ids must be a 1-D integer array, got {ids.dtype} {ids.shape}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and ids.min() < 0:
            raise InvalidArgument("ids must be >= 0")
        return ids

    def _check_codes(self, codes: Any, n: int) -> np.ndarray:
        codes = np.asarray(codes)
        if codes.dtype != np.uint64 or codes.shape != (n, self.words):
            raise InvalidArgument(f"codes must be uint64 of shape ({n}, {self.words}), got {codes.dtype} {codes.shape}")
        return np.ascontiguousarray(codes)

    def saved(self) -> tuple[dict[str, np.ndarray], dict[str, Any]] | None:
        """What persist.write needs to save this index (its code matrix and MIH tables), or None while the
        MIH tables are not built (nothing worth saving)."""
        if not self.mih.built:
            return None
        m = self.matrix
        arrays, scalars = self.mih.saved()
        return {"codes": m.codes, "alive": m.alive, **arrays}, {"n_alive": m.n_alive, **scalars}

    @classmethod
    def restore(cls, bits: int, arrays: dict[str, np.ndarray], scalars: dict[str, Any]) -> MemoryIndex:
        """An index over saved arrays (persist.read: memory-mapped copy-on-write), answering as the saved one."""
        index = cls(bits)
        m = index.matrix
        codes, alive = arrays["codes"], arrays["alive"]
        if codes.dtype != np.uint64 or codes.ndim != 2 or codes.shape[1] != index.words:
            raise InvalidArgument(f"saved code matrix has shape {codes.shape}, not (n, {index.words})")
        if alive.shape != codes.shape[:1] or int(np.count_nonzero(alive)) != int(scalars["n_alive"]):
            raise InvalidArgument("saved alive mask does not match the code matrix")
        if arrays["mih_entries"].shape != (arrays["mih_starts"].size, int(scalars["n_base"])):
            raise InvalidArgument("saved MIH tables do not match their header")
        m.codes, m.alive = codes, alive
        m.stamps = np.zeros(alive.shape[0], np.uint16)
        m.generation = 0
        m.n_alive = int(scalars["n_alive"])
        index.mih.restore(arrays, scalars)
        return index

    def bulk_load(self, ids: np.ndarray, codes: np.ndarray, build: bool = True) -> None:
        """Replace everything. ``build=False`` leaves the tables to the planner, which builds them once the
        queries answered without them have cost as much as building would (see MIH.credit)."""
        self._version += 1
        ids = self._check_ids(ids)
        codes = self._check_codes(codes, ids.size)
        if last_occurrences(ids).size != ids.size:
            raise InvalidArgument("bulk_load ids must be distinct")
        self.matrix.load(ids, codes)
        for s in self.structures.values():
            if build:
                s.rebuild()
            else:
                s.drop()

    def prepare(self) -> None:
        """Build (or compact) the MIH tables now rather than when queries make them pay off."""
        self.mih.ready()

    def _rent(self, cost: float) -> None:
        """A query the scan answered while the MIH tables were unbuilt counts towards building them."""
        if not self.mih.built:
            self.mih.credit += cost

    def add(self, ids: np.ndarray, codes: np.ndarray) -> None:
        self._version += 1
        ids = self._check_ids(ids)
        codes = self._check_codes(codes, ids.size)
        if ids.size == 0:
            return
        # Last occurrence wins when an id repeats within one call.
        keep = last_occurrences(ids)
        if keep.size != ids.size:
            ids, codes = ids[keep], codes[keep]
        self.matrix.put(ids, codes)
        for s in self.structures.values():
            s.added(ids)

    def remove(self, ids: np.ndarray) -> None:
        self._version += 1
        ids = self._check_ids(ids)
        ids = ids[ids < self.matrix.capacity]
        gone = self.matrix.kill(ids[last_occurrences(ids)])
        if gone.size:
            for s in self.structures.values():
                s.removed(gone)

    def __len__(self) -> int:
        return self.matrix.n_alive

    def __contains__(self, id: object) -> bool:
        if isinstance(id, bool) or not isinstance(id, int | np.integer):
            return False
        i = int(id)
        return 0 <= i < self.matrix.capacity and bool(self.matrix.alive[i])

    # ---- queries --------------------------------------------------------------------------------------
    def _check_query(self, query: Any) -> np.ndarray:
        q = np.asarray(query)
        if q.dtype != np.uint64 or q.shape != (self.words,):
            raise InvalidArgument(f"query must be uint64 of shape ({self.words},), got {q.dtype} {q.shape}")
        return np.ascontiguousarray(q)

    @staticmethod
    def _check_force(force: str | None) -> None:
        check_force(force)

    @staticmethod
    def _check_int(name: str, value: Any, low: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int | np.integer) or value < low:
            raise InvalidArgument(f"{name} must be an int >= {low}, got {shown(value)}")
        return int(value)

    def _structure(self, name: str) -> Structure:
        return self.structures[name]

    def costs(self, r: int) -> dict[str, float]:
        """The planner's estimated nanoseconds of a radius-r query per structure."""
        return {name: s.cost(r) for name, s in self.structures.items()}

    def knn_costs(self, k: int) -> dict[str, float]:
        """The planner's estimated nanoseconds of a k-NN query per structure (inf: would not try)."""
        return {name: s.knn_cost(k) for name, s in self.structures.items()}

    def plan(self, r: int) -> str:
        r = self._check_int("r", r, 0)
        if len(self) == 0:
            return "scan"
        if not self.mih.built and self.mih.build_cost() > 0:
            return choose(self.costs(r))  # the build's price falls with every scanned query: no caching
        key = (self._version, self.mih.rebuilds)
        if self._plans_key != key:
            self._plans, self._plans_key = {}, key
        name = self._plans.get(r)
        if name is None:  # the cost model costs ~20 us of Python; cache it until the contents change
            name = self._plans[r] = choose(self.costs(r))
        return name

    def _radius(self, q: np.ndarray, r: int, force: str | None) -> Result:
        if force is not None:
            return cast(Result, self._structure(force).radius(q, r))  # unbounded: never None
        name = self.plan(r)
        if name != "scan":
            # Bounded by what the scan would cost, so a misestimate is never much slower than the scan.
            res = self._structure(name).radius(q, r, budget=int(self.scan.cost(r)))
            if res is not None:
                return res
        self._rent(self.scan.cost(r))
        return self.scan.radius(q, r)

    def radius(self, query: np.ndarray, r: int, force: str | None = None) -> Result:
        self._check_force(force)
        r = self._check_int("r", r, 0)
        return self._radius(self._check_query(query), r, force)

    def radius_many(self, queries: np.ndarray, r: int, force: str | None = None) -> list[Result]:
        self._check_force(force)
        r = self._check_int("r", r, 0)
        qs = np.asarray(queries)
        if qs.dtype != np.uint64 or qs.ndim != 2 or qs.shape[1] != self.words:
            raise InvalidArgument(f"queries must be uint64 of shape (n, {self.words}), got {qs.dtype} {qs.shape}")
        qs = np.ascontiguousarray(qs)
        if len(qs) == 0:
            return []
        if force is not None:
            return cast("list[Result]", self._structure(force).radius_many(qs, r))  # unbounded: a list, no None
        name = self.plan(r)
        if name == "scan":
            self._rent(self.scan.cost(r) * len(qs))
            return self.scan.radius_many(qs, r)  # one pass over the matrix for all queries
        res = list(self._structure(name).radius_many(qs, r, budget=int(self.scan.cost(r))))
        missed = [i for i, x in enumerate(res) if x is None]
        if missed:  # over budget: those queries go to the scan, together
            for i, x in zip(missed, self.scan.radius_many(qs[missed], r), strict=True):
                res[i] = x
        return cast("list[Result]", res)  # the scan answered every None

    def knn(self, query: np.ndarray, k: int, force: str | None = None) -> Result:
        self._check_force(force)
        k = self._check_int("k", k, 1)
        q = self._check_query(query)
        if force is not None:
            return cast(Result, self._structure(force).knn(q, k))  # unbounded: never None
        costs = self.knn_costs(k)
        name = choose(costs)
        if name != "scan":
            # Its estimate is also its budget: past it, the scan answers (see MIH.knn_cost).
            res = self._structure(name).knn(q, k, budget=int(costs[name]))
            if res is not None:
                return res
        self._rent(costs["scan"])
        return self.scan.knn(q, k)

    # ---- introspection --------------------------------------------------------------------------------
    def nbytes(self) -> int:
        return self.matrix.nbytes() + sum(s.nbytes() for s in self.structures.values())

    def stats(self) -> dict[str, Any]:
        return {
            "engine": "numba",
            "bits": self.bits,
            "live": len(self),
            "capacity": self.matrix.capacity,
            "code_bytes": int(self.matrix.codes.nbytes),
            "nbytes": self.nbytes(),
            "structures": {name: s.stats() for name, s in self.structures.items()},
        }
