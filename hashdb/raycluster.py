"""Connecting to Ray, for the two things hashdb runs on it: hashing actors (hashdb.bulk) and self-join tasks
(hashdb.index.ray_join). Ray is optional (``pip install hashdb[ray]``) and imported only here, on use."""

from __future__ import annotations

from typing import Any

from .errors import HashDBError, InvalidArgument

# Set in every worker before numpy/torch load: N processes x N BLAS threads would oversubscribe the cores,
# and one thread per worker keeps each code bit-identical to the in-process one.
SINGLE_THREAD_ENV = {
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "NUMEXPR_NUM_THREADS": "1",
    "NUMBA_NUM_THREADS": "1",
}
RAY_MISSING = "needs the optional 'ray' package: pip install hashdb[ray]"


def import_ray() -> Any:
    try:
        import ray
    except ImportError:
        raise HashDBError(f"--ray / engine='ray' {RAY_MISSING}") from None
    return ray


def ray_init(address: str | None, num_cpus: int | None = None) -> bool:
    """Connect to Ray unless already connected; 'local' starts a private local instance. Returns True when
    this call started the connection (the caller then owns ``ray.shutdown()``)."""
    ray = import_ray()
    if ray.is_initialized():
        return False
    env = {"env_vars": dict(SINGLE_THREAD_ENV)}
    if address in (None, "auto") or address.startswith("ray://") or ":" in address:
        ray.init(address=address or "auto", runtime_env=env, log_to_driver=False)
    elif address == "local":
        ray.init(num_cpus=num_cpus, include_dashboard=False, runtime_env=env, log_to_driver=False,
                 configure_logging=False)  # fmt: skip
    else:
        raise InvalidArgument(f"ray address must be 'local', 'auto', host:port or ray://..., got {address!r}")
    return True
