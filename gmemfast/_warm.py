"""The kernels' first compile: once per install, announced, in parallel, before any run.

numba compiles a kernel on its first call and keeps the machine code in its on-disk cache
(``cache=True``), so only a new install (or a changed ``_kernels.py``) compiles. That
first compile takes seconds; done lazily it would land silently inside the first
operation a user times. :func:`ensure_compiled` is called when a page store is made: if
this install's kernels have not been compiled yet it prints one line, compiles the
kernels every run calls (``"run"``), with the argument types the store passes, in two
processes at once (this one and a forked or spawned worker, each a share of the groups),
and leaves a stamp next to numba's cache. Kernels only some runs call (``"pages"``: the
batched one-page conversions; ``"state"``: checking, saving, loading) are compiled the
same way when first needed, and :func:`compile_seconds` lets a timed run leave that time
out of what it reports. Later runs see the stamps and load the kernels from the cache when
first called.

The stamp names a hash of ``_kernels.py``, the numba and Python versions and the CPU, as
numba's cache does. With ``NUMBA_DISABLE_JIT=1`` nothing is compiled.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import platform
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor

import numba
from numba.core import types as T

from . import _kernels as K

__all__ = ["GROUPS", "KINDS", "SIGNATURES", "compile_group", "compile_seconds", "ensure_compiled", "jit_enabled"]

_TREE = (T.int64[:, ::1], T.int32[:, ::1], T.uint16[::1], T.int64[::1])
_I = T.int64
_B = T.boolean
_IA = T.int64[::1]
_EA = T.int32[::1]
_BA = T.boolean[::1]

# Each kernel the page store calls, with the argument types it passes (after the tree
# arrays where the kernel takes them first).
SIGNATURES = {
    "free_tables": (T.int64[::1],),
    "gcount": (T.int64[::1], _I),
    "get_word": _TREE[:3] + (_I,),
    "get_words": _TREE[:3] + (_I, _I, _IA),
    "walk_count": _TREE[:3] + (_I, _I, _I, _I),
    "walk_first": _TREE[:3] + (_I, _I, _I, _I),
    "dmap_entries": _TREE[:2] + (_I,),
    "dmap_counts": (_TREE[0], _TREE[3]),
    "count_dsplits": (_TREE[0], _TREE[1], _TREE[3]),
    "attribute_ranges": _TREE,
    "check_tree": _TREE + (T.int64[:, ::1],),
    "check_pools": _TREE + (T.uint8[::1], T.uint8[::1]),
    "walk_apply": _TREE + (_I, _I, _I, _I, _I, _I),
    "allocate": _TREE + (_I, _I),
    "accept": _TREE + (_I, _I, _I, _I, _I, _B),
    "zap_guest": _TREE + (_I, _I),
    "punch": _TREE + (_I, _I),
    "convert_page": _TREE + (_I, _B, _B),
    "convert": _TREE + (_I, _I, _B, _B),
    "group_items": (_IA, _IA, _IA, _BA, _EA, _I, _IA, _IA, _IA, _IA, _IA, _BA),
    "convert_many": _TREE + (_IA, _IA, _IA, _BA, _IA, _B, _I, _EA, _IA),
    "group_pages": (_IA, _I, _IA, _IA),
    "convert_pages": _TREE + (_IA, _IA, _B, _B, _I, _EA, _IA),
    "accept_many": _TREE + (_IA, _IA, _I, _I, _I, _B, _B, _I, _EA, _IA, _IA),
    "fallocate_many": _TREE + (_BA, _IA, _IA, _I, _EA, _IA),
    "order_bits_to_pages": _TREE + (_B,),
}

# The kernels a run needs, and how they are shared out between the two compiling
# processes: each group is compiled in one process, so the helpers its kernels share are
# compiled once there (the first, the conversion's, is the longest).
RUN_GROUPS = (
    ("convert", "convert_many", "convert_page", "group_items", "gcount", "free_tables",
     "get_word", "attribute_ranges"),
    ("allocate", "accept", "accept_many", "fallocate_many", "punch", "zap_guest",
     "walk_apply", "walk_count", "walk_first", "get_words", "dmap_counts"),
)
# Batches of one-page conversions converted in place (``PageStore.convert_pages``), and
# the kernels of checking, saving and loading a state: compiled when first needed, so a
# run that needs neither (``boot``) does not wait for them.
PAGE_GROUPS = (
    ("group_pages", "convert_pages"),
)
STATE_GROUPS = (
    ("check_tree", "check_pools", "dmap_entries", "order_bits_to_pages", "count_dsplits"),
)
KINDS = {"run": RUN_GROUPS, "pages": PAGE_GROUPS, "state": STATE_GROUPS}
GROUPS = RUN_GROUPS + PAGE_GROUPS + STATE_GROUPS
ANNOUNCE = {
    "run": "gmemfast: compiling the model's kernels, once per install (some 20 s of CPU time, in two processes)...",
    "pages": "gmemfast: compiling the batched page conversions, once per install (a few seconds)...",
    "state": "gmemfast: compiling the state checks, once per install (a few seconds)...",
}

_DONE: set = set()
_LOCK = threading.Lock()
_SECONDS = [0.0]        # spent in ensure_compiled compiling, or waiting for another process to


def compile_seconds() -> float:
    """Seconds this process has spent on the first compile (compiling, or waiting while
    another process compiled). A timed run subtracts what it spent, so the first run's
    reported time never includes compiling kernels it first needs part way."""
    return _SECONDS[0]


def jit_enabled() -> bool:
    return not numba.config.DISABLE_JIT


def compile_group(names) -> float:
    """Compile (or load from the cache) the kernels ``names``; returns the seconds taken."""
    t0 = time.perf_counter()
    for name in names:
        getattr(K, name).compile(SIGNATURES[name])
    return time.perf_counter() - t0


def _stamp_path(kind: str = "run") -> str:
    with open(K.__file__, "rb") as f:
        h = hashlib.sha256(f.read())
    try:
        import llvmlite.binding as ll
        cpu = ll.get_host_cpu_name()
    except Exception:        # pragma: no cover - llvmlite always has it
        cpu = platform.machine()
    h.update(f"{numba.__version__} {sys.version_info[:2]} {cpu} {KINDS[kind]}".encode())
    return os.path.join(K.convert.stats.cache_path, f"gmemfast-kernels-{kind}-{h.hexdigest()[:16]}.ok")


def _context():
    """Fork where it is safe (this process runs one thread), else spawn."""
    if threading.active_count() == 1 and "fork" in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def ensure_compiled(kind: str = "run", announce=None) -> bool:
    """Compile the kernels of ``kind`` (``"run"``: what a run needs; ``"state"``: checking,
    saving and loading) now if this install has not compiled them yet (see the module
    docstring). ``announce(text)`` is told before compiling starts (default: one line on
    standard error). Returns True if it compiled."""
    if kind in _DONE or not jit_enabled():
        return False
    t0 = time.perf_counter()
    try:
        return _ensure_compiled(kind, announce)
    finally:
        _SECONDS[0] += time.perf_counter() - t0


def _ensure_compiled(kind: str, announce) -> bool:
    with _LOCK:
        if kind in _DONE:
            return False
        stamp = _stamp_path(kind)
        if os.path.exists(stamp):
            _DONE.add(kind)
            return False
        with _FileLock(stamp + ".lock"):
            if os.path.exists(stamp):       # another process compiled them meanwhile
                _DONE.add(kind)
                return False
            text = ANNOUNCE[kind]
            if announce is None:
                print(text, file=sys.stderr, flush=True)
            else:
                announce(text)
            groups = KINDS[kind]
            rest = list(groups)
            if len(groups) > 1 and (os.cpu_count() or 1) > 1:
                try:
                    with ProcessPoolExecutor(1, mp_context=_context()) as pool:
                        others = [pool.submit(compile_group, g) for g in groups[1:]]
                        compile_group(groups[0])
                        rest = [g for g, f in zip(groups[1:], others) if f.exception() is not None]
                except OSError:                  # no process to be had: all here
                    pass
            for g in rest:                       # what no worker did (this process loads the
                compile_group(g)                 # others' kernels from the cache when called)
            try:
                with open(stamp, "w") as f:
                    f.write(f"{time.time():.0f}\n")
            except OSError:                      # a read-only cache: compile again next time
                pass
        _DONE.add(kind)
        return True


class _FileLock:
    """An exclusive lock on a file (POSIX ``flock``), so that processes starting together
    (test workers, a sweep) compile once; where locking is unavailable, no lock."""

    def __init__(self, path):
        self.path = path
        self.f = None

    def __enter__(self):
        try:
            import fcntl
            self.f = open(self.path, "a")
            fcntl.flock(self.f, fcntl.LOCK_EX)
        except (ImportError, OSError):
            self.f = None
        return self

    def __exit__(self, *exc):
        if self.f is not None:
            self.f.close()
        return False
