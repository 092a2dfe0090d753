"""Native kernels: the CPU's linear-quadratic passes compiled from C on first use, with PyTorch
operations as the fallback; also the Euler steps of the built-in models
(``diffmpc.systems.Pendulum`` and ``Cartpole``): the line search's rollouts and their
derivatives (``model_rollout``, ``model_search``, ``model_expansion``).

On a CPU the sequential passes of a batched LQ solve (Riccati recursions, rollouts, costates)
and the products over its ``[B, T]`` blocks (``C tau``, ``F' lam``, gradient outer products)
are chains of small operations, which BLAS and PyTorch's dispatch run far below this machine's
peak (``BENCHMARKS.md``). ``_native/lq.c`` runs each as one loop, with several samples in the
lanes of each vector instruction where the work is arithmetic. It is compiled once per machine
with the system's C compiler (``$CC``, else ``cc``; a few seconds) into a cache directory
(``$DIFFMPC_CACHE_DIR``, else ``$XDG_CACHE_HOME/diffmpc``, else ``~/.cache/diffmpc``) and loaded
with ctypes: no build step at install time, no Python headers.

Each kernel splits its batch over ``torch.get_num_threads()`` threads (at least 16 samples each
for the Riccati passes, 64 for the others) where the compiler has OpenMP (``threaded()``;
``DIFFMPC_NATIVE_OPENMP=0`` builds without). The library then uses the OpenMP runtime that
PyTorch has loaded, whose threads also run PyTorch's operations: a pool of its own would compete
with them for the cores (PyTorch's idle threads spin for a while after each operation). Every
sample is computed by the same arithmetic whatever the thread count: the results do not depend
on it. In a forked child the kernels run on the calling thread (GNU OpenMP's pool does not
survive a fork; PyTorch's own operations on large tensors hang there too).

The kernels run where ``handles`` says so: CPU tensors of float32 or float64, and no autograd
recording through them (unrolled and double-backward gradients keep PyTorch operations). Where
there is no compiler, or the build fails, or ``DIFFMPC_NATIVE=0`` is set, ``available()`` is
False, ``status()`` says why, and every solve uses PyTorch operations (the same results to
rounding). Nothing is printed.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["available", "threaded", "status", "enabled", "riccati", "multipliers", "rollout",
           "costate", "feedforward", "check_cost", "matvec", "matvec_pair", "outer", "quad_value",
           "homogeneous", "homogeneous_cost", "scalar_riccati", "scalar_riccati_raw",
           "model_rollout", "model_search", "model_expansion", "model_newton"]

_SOURCES = ("lq.c", "lq_body.h")
_OFF = ("0", "false", "no", "off")
_FLAGS = ("-O3", "-ffp-contract=fast", "-shared", "-fPIC", "-std=c11")
_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None  # why the library is not available; None before the first attempt
_enabled = True  # switched by ``enabled`` (tests compare both paths)
_threaded = False  # built with OpenMP


def _cache_dir() -> Path:
    root = os.environ.get("DIFFMPC_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "diffmpc"


def _cpu_key() -> str:
    """What the compiled code depends on besides the sources: the machine (``-march=native``)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "model name", "Features")):
                    flags += line
                    if flags.count("\n") >= 2:
                        break
    except OSError:
        pass
    return platform.machine() + platform.system() + flags


def _compile(cc: str, flags: tuple[str, ...], version: str) -> Path:
    """The library built from the sources with these flags: from the cache, else compiled into
    it. A failed build leaves a marker, so that the next process does not try it again."""
    src = Path(__file__).with_name("_native")
    digest = hashlib.sha256()
    for name in _SOURCES:
        digest.update((src / name).read_bytes())
    digest.update((cc + version + " ".join(flags) + _cpu_key()).encode())
    name = f"lq-{digest.hexdigest()[:16]}.so"
    out = _cache_dir() / name
    if out.exists():
        return out
    marker = out.with_suffix(".failed")
    if marker.exists():
        raise RuntimeError(f"{marker.read_text()} (an earlier build; delete {marker} to retry)")
    # build beside the target, then rename: concurrent processes (pytest -n) never load a
    # half-written library; a cache directory that cannot be written gives way to the system's
    # temporary directory
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    except OSError:
        out = Path(tempfile.gettempdir()) / f"diffmpc-{os.getuid()}" / name
        out.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=out.parent)
    os.close(fd)
    try:
        res = subprocess.run([cc, *flags, "-o", tmp, str(src / "lq.c")],
                             capture_output=True, text=True, timeout=300)
        if res.returncode != 0:
            reason = f"{cc} failed to compile {src / 'lq.c'}: {res.stderr.strip()[-2000:]}"
            with contextlib.suppress(OSError):
                marker.write_text(reason)
            raise RuntimeError(reason)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _build() -> ctypes.CDLL:
    global _threaded
    cc = os.environ.get("CC", "cc")
    # the target CPU: this machine's by default (DIFFMPC_NATIVE_MARCH=x86-64-v3, for example,
    # builds for any AVX2 machine: four samples per vector instead of eight with AVX-512)
    flags = (f"-march={os.environ.get('DIFFMPC_NATIVE_MARCH', 'native')}",) + _FLAGS
    if shutil.which(cc) is None:
        raise RuntimeError(f"no C compiler found (tried {cc!r}; set CC to use another)")
    version = subprocess.run([cc, "--version"], capture_output=True, text=True,
                             timeout=60).stdout
    lib = None
    # threads by OpenMP where the compiler has it (DIFFMPC_NATIVE_OPENMP=0: never); the library
    # then shares the OpenMP runtime PyTorch has loaded (the same soname), and its threads
    if os.environ.get("DIFFMPC_NATIVE_OPENMP", "1").strip().lower() not in _OFF:
        try:
            lib = ctypes.CDLL(str(_compile(cc, flags + ("-fopenmp",), version)))
            _threaded = True
        except (OSError, RuntimeError, subprocess.SubprocessError):
            lib = None
    if lib is None:
        lib = ctypes.CDLL(str(_compile(cc, flags, version)))
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    signatures = {"riccati": [ctypes.c_int] + [i64] * 4 + [ptr] * 15,
                  "multipliers": [ctypes.c_int] + [i64] * 4 + [ptr] * 6,
                  "rollout": [ctypes.c_int] + [i64] * 4 + [ptr] * 8 + [ctypes.c_int, ptr, ptr],
                  "costate": [ctypes.c_int] + [i64] * 3 + [ptr] * 5,
                  "feedforward": [ctypes.c_int] + [i64] * 4 + [ptr] * 11,
                  "check_cost": [ctypes.c_int] + [i64] * 3 + [ptr] * 3,
                  "matvec": [ctypes.c_int] + [i64] * 4 + [ptr] * 4 + [ctypes.c_int, ptr],
                  "matvec_pair": [ctypes.c_int] + [i64] * 4 + [ptr] * 8,
                  "outer": [ctypes.c_int] + [i64] * 4 + [ptr] * 8 + [ctypes.c_double, ptr],
                  "quad_value": [ctypes.c_int] + [i64] * 3 + [ptr] * 8,
                  "homogeneous": [ctypes.c_int] + [i64] * 4 + [ptr] * 6
                  + [ctypes.c_double, ptr, ptr],
                  "scalar_riccati": [ctypes.c_int] + [i64] * 3 + [ptr] * 19,
                  "scalar_riccati_raw": [ctypes.c_int] + [i64] * 3 + [ptr] * 7 + [i64]
                  + [ptr] * 15,
                  "model_rollout": [ctypes.c_int, ctypes.c_int, ptr] + [i64] * 5 + [ptr] * 6,
                  "model_search": [ctypes.c_int, ctypes.c_int, ptr] + [i64] * 5 + [ptr] * 13,
                  "model_expansion": [ctypes.c_int, ctypes.c_int, ptr] + [i64] * 3 + [ptr] * 8,
                  "model_newton": [ctypes.c_int, ctypes.c_int, ptr] + [i64] * 3 + [ptr] * 9}
    for suffix in ("f64", "f32"):
        for name, args in signatures.items():
            fn = getattr(lib, f"diffmpc_{name}_{suffix}")
            fn.argtypes = args
            fn.restype = ctypes.c_int
    lib.diffmpc_lanes.argtypes = []
    lib.diffmpc_lanes.restype = ctypes.c_int
    return lib


def _load() -> ctypes.CDLL | None:
    global _lib, _reason
    if _lib is not None or _reason is not None:
        return _lib
    with _lock:
        if _lib is None and _reason is None:
            if os.environ.get("DIFFMPC_NATIVE", "1").strip().lower() in _OFF:
                _reason = "disabled by DIFFMPC_NATIVE"
            else:
                try:
                    _lib = _build()
                except (OSError, RuntimeError, AttributeError, subprocess.SubprocessError) as err:
                    _reason = str(err)
    return _lib


def available() -> bool:
    """Whether the native kernels are compiled, loaded and enabled (builds them on first call)."""
    return _enabled and _load() is not None


def threaded() -> bool:
    """Whether the kernels split their batch over ``torch.get_num_threads()`` threads (built with
    OpenMP; else each runs on the calling thread)."""
    return available() and _threaded


def status() -> str:
    """``"available"``, or why the native kernels are not used."""
    if not _enabled:
        return "disabled by diffmpc.native.enabled(False)"
    return "available" if _load() is not None else f"unavailable: {_reason}"


class enabled:
    """``with diffmpc.native.enabled(False): ...`` runs PyTorch operations instead of the
    kernels inside the block (``enabled(True)``: the kernels where available)."""

    def __init__(self, on: bool):
        self._on = bool(on)

    def __enter__(self):
        global _enabled
        self._before, _enabled = _enabled, self._on
        return self

    def __exit__(self, *exc):
        global _enabled
        _enabled = self._before


def handles(C: Tensor, *others: Tensor | None) -> bool:
    """Whether the native kernels can take these tensors: on the CPU, float32 or float64, none
    requiring grad while grad mode records."""
    if C.device.type != "cpu" or C.dtype not in (torch.float64, torch.float32):
        return False
    tensors = (C,) + tuple(o for o in others if o is not None)
    if torch.is_grad_enabled() and any(o.requires_grad for o in tensors):
        return False
    return all(o.dtype == C.dtype or o.dtype == torch.bool for o in tensors) and available()


def _view(t: Tensor | None) -> tuple:
    """A tensor's data pointer and element strides for the kernels (NULL, NULL for None)."""
    if t is None:
        return None, None
    return t.data_ptr(), (ctypes.c_int64 * t.dim())(*t.stride())


def _kernel(name: str, dtype: torch.dtype):
    suffix = "f64" if dtype == torch.float64 else "f32"
    return getattr(_load(), f"diffmpc_{name}_{suffix}")


# the fewest samples one thread takes: the Riccati passes' work per sample is large; the other
# kernels' is a few microseconds, about what waking a thread costs
_GRAIN_PASS = 16
_GRAIN = 64


def _threads(count: int, grain: int) -> int:
    """Threads for a kernel over ``count`` samples: ``torch.get_num_threads()``, but at least
    ``grain`` samples each (the kernels run on OpenMP's threads, PyTorch's own where it has
    loaded OpenMP, so they never compete with a second pool); one in a forked child."""
    if _forked:
        return 1
    return max(1, min(torch.get_num_threads(), count // grain))


def _after_fork() -> None:
    # a forked child's copy of OpenMP's thread pool has no threads behind it: GNU OpenMP hangs
    # in its next parallel region (PyTorch's own operations do too, on large tensors); the
    # kernels then run on the calling thread and make no OpenMP call
    global _forked
    _forked = True


_forked = False
os.register_at_fork(after_in_child=_after_fork)


def _lanes() -> int:
    """Samples per vector of the compiled kernels (the layout of ``riccati``'s rows)."""
    return _load().diffmpc_lanes()


def _bool(free: Tensor | None) -> None:
    if free is not None and free.dtype != torch.bool:
        raise ValueError(f"free: expected a bool tensor, got {free.dtype}")


def riccati(C: Tensor, c: Tensor, Fh: Tensor | None, free: Tensor | None, n: int,
            expected: bool, held: Tensor | None = None, rows: bool = False
            ) -> tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor | None]:
    """The native Riccati pass (see ``_native/lq_body.h``).

    Args:
        C: ``[B, T, p, p]`` view (any strides). c: ``[B, T, p]`` view.
        Fh: ``[B, T-1, n+1, p+1]`` view of the homogeneous dynamics, or None if T = 1.
        free: ``[B, T, m]`` bool view, or None (all free).
        n: state size.
        expected: compute dV.
        held: ``[B, T, m]`` view, the values of the held controls (``~free``), or None (held at
            zero); their rows of k are these values.
        rows: also return Qu, the control rows of ``[Q | q]`` (before the held terms move), as
            the kernel stores them: ``[T, groups, m, p+1, lanes]`` (``multipliers`` reads them).

    Returns:
        Kh ``[T, B, m, n+1]``, L ``[T, B, m, m]``, info ``[T, B]`` (int32), dV ``[B, 2]`` or None,
        Qu or None.
    """
    B, T, p = C.shape[0], C.shape[1], C.shape[-1]
    m = p - n
    _bool(free)
    if held is not None and free is None:
        raise ValueError("held: expected None where free is None (nothing is held), got a tensor")
    Kh = C.new_empty(T, B, m, n + 1)
    L = C.new_empty(T, B, m, m)
    info = torch.empty(T, B, dtype=torch.int32)
    dV = C.new_empty(B, 2) if expected else None
    Qu = None
    if rows:
        lanes = _lanes()
        Qu = C.new_empty(T, (B + lanes - 1) // lanes, m, p + 1, lanes)
    rc = _kernel("riccati", C.dtype)(_threads(B, _GRAIN_PASS), B, T, n, m, *_view(C), *_view(c),
                                     *_view(Fh), *_view(free), Kh.data_ptr(), L.data_ptr(),
                                     info.data_ptr(), None if dV is None else dV.data_ptr(),
                                     *_view(held), None if Qu is None else Qu.data_ptr())
    if rc != 0:
        raise MemoryError("diffmpc.native.riccati: out of memory")
    return Kh, L, info, dV, Qu


def multipliers(Qu: Tensor, x: Tensor, u: Tensor) -> Tensor:
    """``Qu_t [x_t; u_t; 1]`` ``[B, T, m]`` for the rows ``Qu`` of ``riccati(..., rows=True)`` and
    x ``[B, T, n]``, u ``[B, T, m]`` (views)."""
    B, T, m = u.shape
    gu = u.new_empty(B, T, m)
    _kernel("multipliers", u.dtype)(_threads(B, _GRAIN), B, T, x.shape[-1], m, Qu.data_ptr(),
                                    *_view(x), *_view(u), gu.data_ptr())
    return gu


def rollout(K: Tensor, k: Tensor, Fh: Tensor | None, x0: Tensor, offsets: bool
            ) -> tuple[Tensor, Tensor]:
    """The native closed-loop rollout of ``lqr.rollout_affine``.

    Args:
        K: ``[B, T, m, n]`` view. k: ``[B, T, m]`` view.
        Fh: ``[B, T-1, n+1, p+1]`` view of the homogeneous dynamics, or None if T = 1.
        x0: ``[B, n]``. offsets: add the dynamics' offsets.

    Returns:
        x ``[B, T, n]``, u ``[B, T, m]``.
    """
    B, T, m, n = K.shape
    x, u = K.new_empty(B, T, n), K.new_empty(B, T, m)
    _kernel("rollout", K.dtype)(_threads(B, _GRAIN), B, T, n, m, *_view(K), *_view(k), *_view(Fh),
                                *_view(x0), int(offsets), x.data_ptr(), u.data_ptr())
    return x, u


def costate(gx: Tensor, Fx: Tensor | None) -> Tensor:
    """The native ``lqr.costate``: gx ``[B, T, n]`` view, Fx ``[B, T-1, n, n]`` view or None if
    T = 1; returns lam ``[B, T, n]``."""
    B, T, n = gx.shape
    lam = gx.new_empty(B, T, n)
    _kernel("costate", gx.dtype)(_threads(B, _GRAIN), B, T, n, *_view(gx), *_view(Fx),
                                 lam.data_ptr())
    return lam


def feedforward(c: Tensor, Fh: Tensor | None, K: Tensor, free: Tensor | None, L: Tensor
                ) -> Tensor:
    """The native ``lqr.feedforward``: c ``[B, T, p]``, Fh as in ``riccati``, K ``[B, T, m, n]``,
    free ``[B, T, m]`` bool or None, L ``[B, T, m, m]`` (views); returns k ``[B, T, m]``."""
    B, T, m, n = K.shape
    _bool(free)
    k = c.new_empty(B, T, m)
    rc = _kernel("feedforward", c.dtype)(_threads(B, _GRAIN), B, T, n, m, *_view(c), *_view(Fh),
                                         *_view(K), *_view(free), *_view(L), k.data_ptr())
    if rc != 0:
        raise MemoryError("diffmpc.native.feedforward: out of memory")
    return k


def check_cost(C: Tensor, n: int) -> tuple[int, float, float, int]:
    """The checks of ``mpc._check_cost`` in one pass over ``C [N, p, p]`` (a view): the number of
    NaN or infinite entries, the largest finite ``|C_ij|``, the largest ``|C_ij - C_ji|`` and the
    number of blocks whose control block ``C[n:, n:]`` is not positive definite."""
    N, p = C.shape[0], C.shape[-1]
    out = (ctypes.c_double * 4)()
    rc = _kernel("check_cost", C.dtype)(_threads(N, 64 * _GRAIN), N, p, n, *_view(C), out)
    if rc != 0:
        raise MemoryError("diffmpc.native.check_cost: out of memory")
    return int(out[0]), float(out[1]), float(out[2]), int(out[3])


def blocks(A: Tensor, *vectors: Tensor | None) -> bool:
    """Whether the batched-product kernels take ``A [B, T, r, c]`` and the vectors
    ``[B, T, k]`` (same B and T; None is skipped): the shapes, and ``handles``."""
    if A.dim() != 4:
        return False
    vs = [v for v in vectors if v is not None]
    return all(v.dim() == 3 and v.shape[:2] == A.shape[:2] for v in vs) and handles(A, *vs)


def matvec(A: Tensor, x: Tensor, trans: bool = False) -> Tensor:
    """``A x`` (``[B, T, r]``) or ``A' x`` (``[B, T, c]``) for ``A [B, T, r, c]``."""
    B, T, r, c = A.shape
    y = A.new_empty(B, T, c if trans else r)
    _kernel("matvec", A.dtype)(_threads(B, _GRAIN), B, T, r, c, *_view(A), *_view(x), int(trans),
                               y.data_ptr())
    return y


def matvec_pair(A: Tensor, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
    """``(A x, A' y)`` in one pass over ``A [B, T, r, c]``."""
    B, T, r, c = A.shape
    ax, aty = A.new_empty(B, T, r), A.new_empty(B, T, c)
    _kernel("matvec_pair", A.dtype)(_threads(B, _GRAIN), B, T, r, c, *_view(A), *_view(x),
                                    *_view(y), ax.data_ptr(), aty.data_ptr())
    return ax, aty


def outer(g: Tensor, x: Tensor, y: Tensor | None = None, z: Tensor | None = None,
          alpha: float = 1.0) -> Tensor:
    """``alpha (g x' + y z')`` (or ``alpha g x'``), ``[B, T, r, c]`` for g, y ``[B, T, r]`` and
    x, z ``[B, T, c]``: a gradient block formed in one pass."""
    B, T, r = g.shape
    c = x.shape[-1]
    G = g.new_empty(B, T, r, c)
    _kernel("outer", g.dtype)(_threads(B, _GRAIN), B, T, r, c, *_view(g), *_view(x), *_view(y),
                              *_view(z), float(alpha), G.data_ptr())
    return G


def quad_value(C: Tensor, c: Tensor, tau: Tensor, with_product: bool = False):
    """``1/2 tau' C tau + c' tau`` ``[B, T]`` for C ``[B, T, p, p]``, c and tau ``[B, T, p]``;
    with ``with_product``, also ``C tau`` ``[B, T, p]`` (from the same pass)."""
    B, T, p = tau.shape
    v = tau.new_empty(B, T)
    Ct = tau.new_empty(B, T, p) if with_product else None
    _kernel("quad_value", C.dtype)(_threads(B, _GRAIN), B, T, p, *_view(C), *_view(c), *_view(tau),
                                   v.data_ptr(), None if Ct is None else Ct.data_ptr())
    return (v, Ct) if with_product else v


def _homogeneous(M: Tensor, top: Tensor | None, left: Tensor | None, corner: float,
                 batch_last: bool) -> Tensor:
    """``[[corner, top'], [left, M]]`` per sample and step of ``M [B, T, r, c]``, time-major
    ``[T, B, r+1, c+1]`` or batch-last ``[T, r+1, c+1, B]`` (zeros for a None top or left)."""
    B, T, r, c = M.shape
    H = M.new_empty((T, r + 1, c + 1, B) if batch_last else (T, B, r + 1, c + 1))
    view = H.permute(0, 3, 1, 2) if batch_last else H  # [T, B, r+1, c+1]
    _kernel("homogeneous", M.dtype)(_threads(B, _GRAIN), B, T, r, c, *_view(M), *_view(top),
                                    *_view(left), float(corner), H.data_ptr(),
                                    (ctypes.c_int64 * 4)(*view.stride()))
    return H


def homogeneous(F: Tensor, d: Tensor | None, batch_last: bool = False) -> Tensor:
    """``lqr.homogeneous_dynamics(F, d, batch_last)`` (``[[1, 0], [d, F]]``, time-major
    ``[T-1, B, n+1, p+1]`` or batch-last ``[T-1, n+1, p+1, B]``) in one pass."""
    return _homogeneous(F, None, d, 1.0, batch_last)


def homogeneous_cost(C: Tensor, c: Tensor, batch_last: bool = False) -> Tensor:
    """``lqr.homogeneous_cost(C, c, batch_last)`` (``[[0, c'], [c, C]]``) in one pass."""
    return _homogeneous(C, c, c, 0.0, batch_last)


def scalar_riccati(Ch: Tensor, Fh: Tensor | None, n: int, lower: Tensor | None,
                   upper: Tensor | None, free: Tensor | None, reg: Tensor | None,
                   floor: Tensor | None) -> tuple[Tensor, ...]:
    """The one-control pass of ``lqr._scalar_riccati`` (see ``_native/lq_body.h``).

    Args:
        Ch: ``[B, T, p+1, p+1]`` view of the homogeneous cost. Fh: ``[B, T-1, n+1, p+1]`` view
            of the homogeneous dynamics, or None if T = 1.
        lower, upper: ``[B, T]`` views (box mode), or None. free: ``[B, T]`` bool view, or None.
        reg, floor: ``[B]``, or None.

    Returns:
        Kh ``[T, B, n+1]``, free ``[T, B]`` (bool), qu, h (floored), h_r (regularized) ``[T, B]``.
    """
    B, T = Ch.shape[:2]
    _bool(free)
    Kh = Ch.new_empty(T, B, n + 1)
    f = torch.empty(T, B, dtype=torch.bool)
    qu, h, hr = (Ch.new_empty(T, B) for _ in range(3))
    rc = _kernel("scalar_riccati", Ch.dtype)(
        _threads(B, _GRAIN_PASS), B, T, n, *_view(Ch), *_view(Fh), *_view(lower), *_view(upper),
        *_view(free), *_view(reg), *_view(floor), Kh.data_ptr(), f.data_ptr(), qu.data_ptr(),
        h.data_ptr(), hr.data_ptr())
    if rc != 0:
        raise MemoryError("diffmpc.native.scalar_riccati: out of memory")
    return Kh, f, qu, h, hr


def scalar_riccati_raw(C: Tensor, c: Tensor, F: Tensor | None, lower: Tensor | None,
                       upper: Tensor | None, reg: Tensor | None, floor: Tensor | None,
                       Hb: Tensor | None = None, first: int = 0, newton: Tensor | None = None
                       ) -> tuple[Tensor, ...]:
    """``scalar_riccati`` on the raw operands of an iLQR step instead of homogeneous copies:
    the pass over ``[[0, c'], [c, C]]`` and ``[[1, 0], [0, F]]``, with the curvature blocks
    ``Hb [T-1, 4, 4, B]`` (``TrajDynamics.curvature_blocks``) added at coordinate ``first`` of
    ``[x, u]`` for the samples flagged in ``newton [B]`` (all if None).

    Args:
        C: ``[B, T, p, p]`` view (broadcast strides allowed). c: ``[B, T, p]`` view. F: ``[B,
            T-1, n, p]`` view, or None if T = 1. lower, upper: ``[B, T]`` views (box mode), or
            None. reg, floor: ``[B]``, or None.

    Returns:
        as ``scalar_riccati``.
    """
    B, T, p = c.shape
    n = p - 1
    if Hb is not None and (Hb.shape != (T - 1, 4, 4, B) or not Hb.is_contiguous()
                           or not 0 <= first <= p - 4):
        raise ValueError(f"Hb: expected a contiguous [{T - 1}, 4, 4, {B}] block at a coordinate "
                         f"in 0..{p - 4}, got {tuple(Hb.shape)} at {first}")
    nw = None if newton is None or Hb is None else newton.to(torch.bool)
    Kh = c.new_empty(T, B, n + 1)
    f = torch.empty(T, B, dtype=torch.bool)
    qu, h, hr = (c.new_empty(T, B) for _ in range(3))
    rc = _kernel("scalar_riccati_raw", c.dtype)(
        _threads(B, _GRAIN_PASS), B, T, n, *_view(C), *_view(c), *_view(F),
        None if Hb is None else Hb.data_ptr(), int(first), *_view(nw), *_view(lower),
        *_view(upper), *_view(reg), *_view(floor), Kh.data_ptr(), f.data_ptr(), qu.data_ptr(),
        h.data_ptr(), hr.data_ptr())
    if rc != 0:
        raise MemoryError("diffmpc.native.scalar_riccati_raw: out of memory")
    return Kh, f, qu, h, hr


def _model_consts(consts: Tensor) -> Tensor:
    """A built-in model's constants as the kernels read them: float64, contiguous."""
    return consts.detach().to(torch.float64).contiguous()


def _model_operands(consts: Tensor, x_init: Tensor, x, u, K, k, lower, upper, C, c):
    """The model kernels' operand arrays: constants (float64), pointers and strides (each
    stride array kept alive in the returned tuple)."""
    if (lower is None) != (upper is None):
        raise ValueError("lower, upper: expected both or neither, got one of them")
    p = _model_consts(consts)
    views = [_view(t) for t in (x_init, x, u, K, k, lower, upper, C, c)]
    ptrs = (ctypes.c_void_p * 9)(*(v[0] for v in views))
    strides = (ctypes.POINTER(ctypes.c_int64) * 9)(
        *(ctypes.cast(v[1], ctypes.POINTER(ctypes.c_int64)) for v in views))
    return p, ptrs, strides, views


# the first coordinate in [x, u] of each built-in model's curvature block (the cartpole's
# position and velocity enter its step linearly)
_BLOCK_FIRST = {1: 0, 2: 2}


def _model_error(model: int, n: int, m: int) -> ValueError:
    return ValueError(f"model: expected 1 (n = 3, m = 1) or 2 (n = 5, m = 1), got {model} with "
                      f"n = {n}, m = {m}")


def model_rollout(model: int, consts: Tensor, x_init: Tensor, u: Tensor, x: Tensor | None = None,
                  K: Tensor | None = None, k: Tensor | None = None, alphas: Tensor | None = None,
                  lower: Tensor | None = None, upper: Tensor | None = None,
                  C: Tensor | None = None, c: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """Rollouts of a built-in model's Euler step (``_native_model`` of ``diffmpc.systems``'
    Pendulum and Cartpole: ``model`` 1 or 2, ``consts`` their constants).

    Open loop (K None): the states ``[1, B, T, n]`` of the controls ``u [B, T, m]``, and u.
    Closed loop: for every step size ``alphas [A]``, ``u_t = clamp(u_t + alpha k_t + K_t (x_t' -
    x_t), lower_t, upper_t)`` along the new states x' (``ilqr._closed_loop``); x ``[B, T, n]``,
    K ``[B, T, m, n]``, k ``[B, T, m]``, lower and upper ``[B, T, m]`` or None (views).
    With a quadratic cost's C ``[B, T, p, p]`` and c ``[B, T, p]`` (views), also the cost of
    every rollout.

    Returns X ``[A, B, T, n]``, U ``[A, B, T, m]``, and the costs ``[A, B]`` or None.
    """
    B, T, m = u.shape
    n = x_init.shape[-1]
    A = 1 if K is None else alphas.shape[0]
    p, ptrs, strides, _keep = _model_operands(consts, x_init, x, u, K, k, lower, upper, C, c)
    X, U = u.new_empty(A, B, T, n), u.new_empty(A, B, T, m)
    J = None if C is None else u.new_empty(A, B)
    al = None if alphas is None else alphas.contiguous()
    rc = _kernel("model_rollout", u.dtype)(
        _threads(A * B, _GRAIN), model, p.data_ptr(), A, B, T, n, m,
        None if al is None else al.data_ptr(), ptrs, strides, X.data_ptr(), U.data_ptr(),
        None if J is None else J.data_ptr())
    if rc != 0:
        raise _model_error(model, n, m)
    return X, U, J


def model_search(model: int, consts: Tensor, x_init: Tensor, u: Tensor, x: Tensor, K: Tensor,
                 k: Tensor, alphas: Tensor, lower: Tensor | None, upper: Tensor | None,
                 C: Tensor, c: Tensor, J0: Tensor, floor: Tensor, near: Tensor,
                 rest: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The line search of ``ilqr._search`` on a built-in model's compiled step (operands as in
    ``model_rollout``): each sample rolls out the step sizes ``alphas [A]`` in turn and stops at
    the first whose cost is below ``J0 [B]`` (the full step also where ``near [B]`` and its
    cost is at most ``J0 + floor [B]``), so that no sample rolls out the sizes after the one it
    takes. ``rest [B, T]`` (a view, or None): a lower bound on the cost of the stages after each
    step (``TrajCost.rest_minima``); a rollout stops where its cost so far plus that exceeds the
    limit (by a relative 1e-6: rounding never stops one that would be taken), as the diverging
    rollouts of a bad step do within a few steps.

    Returns x ``[B, T, n]``, u ``[B, T, m]``, cost ``[B]`` of that step, its index ``[B]``
    (long) and whether one was found ``[B]`` (bool; where not, index 0 and the last step's
    trajectory, partial and with cost inf where stopped).
    """
    B, T, m = u.shape
    n = x_init.shape[-1]
    p, ptrs, strides, _keep = _model_operands(consts, x_init, x, u, K, k, lower, upper, C, c)
    X, U, J = u.new_empty(B, T, n), u.new_empty(B, T, m), u.new_empty(B)
    first = torch.empty(B, dtype=torch.long)
    found = torch.empty(B, dtype=torch.bool)
    J0, floor, near, al = (t.contiguous() for t in (J0, floor, near.to(torch.bool), alphas))
    rc = _kernel("model_search", u.dtype)(
        _threads(B, _GRAIN), model, p.data_ptr(), alphas.shape[0], B, T, n, m, al.data_ptr(),
        ptrs, strides, J0.data_ptr(), floor.data_ptr(), near.data_ptr(), *_view(rest),
        X.data_ptr(), U.data_ptr(), J.data_ptr(), first.data_ptr(), found.data_ptr())
    if rc != 0:
        raise _model_error(model, n, m)
    return X, U, J, first, found


def model_expansion(model: int, consts: Tensor, x: Tensor, u: Tensor, lam: Tensor | None = None,
                    jacobian: bool = True) -> tuple[Tensor | None, Tensor | None, int]:
    """Derivatives of a built-in model's Euler step (``model_rollout``'s ``model`` and
    ``consts``) at x ``[B, T1, n]``, u ``[B, T1, 1]`` (views): the Jacobian ``[B, T1, n, n+1]``
    in ``[x, u]`` (if ``jacobian``) and, with the weights ``lam [B, T1, n]``, the curvature
    block ``[T1, 4, 4, B]`` of ``TrajDynamics.curvature_blocks``, and the block's first
    coordinate in ``[x, u]`` (0 for the pendulum, 2 for the cartpole)."""
    B, T1, n = x.shape
    J = x.new_empty(B, T1, n, n + 1) if jacobian else None
    H = None if lam is None else x.new_empty(T1, 4, 4, B)
    p = _model_consts(consts)
    rc = _kernel("model_expansion", x.dtype)(
        _threads(B, _GRAIN), model, p.data_ptr(), B, T1, n, *_view(x), *_view(u), *_view(lam),
        None if J is None else J.data_ptr(), None if H is None else H.data_ptr())
    if rc != 0:
        raise _model_error(model, n, u.shape[-1])
    return J, H, _BLOCK_FIRST[model]


def model_newton(model: int, consts: Tensor, x: Tensor, u: Tensor, gx: Tensor
                 ) -> tuple[Tensor, Tensor, Tensor, int]:
    """What a Newton iteration needs of a built-in model (``model_expansion``'s ``model`` and
    ``consts``) along x ``[B, T, n]``, u ``[B, T, 1]`` with the cost gradient ``gx [B, T, n]``
    (views), in one pass: the Jacobian ``[B, T-1, n, n+1]``, the costate ``[B, T, n]``
    (``lqr.costate(gx, Fx)``) and the curvature blocks ``[T-1, 4, 4, B]`` weighted by it
    (``TrajDynamics.curvature_blocks``), and the blocks' first coordinate; the same numbers as
    those three calls."""
    B, T, n = x.shape
    J = x.new_empty(B, T - 1, n, n + 1)
    lam = x.new_empty(B, T, n)
    H = x.new_empty(T - 1, 4, 4, B)
    p = _model_consts(consts)
    rc = _kernel("model_newton", x.dtype)(
        _threads(B, _GRAIN), model, p.data_ptr(), B, T, n, *_view(x), *_view(u), *_view(gx),
        J.data_ptr(), lam.data_ptr(), H.data_ptr())
    if rc != 0:
        raise _model_error(model, n, u.shape[-1])
    return J, lam, H, _BLOCK_FIRST[model]
