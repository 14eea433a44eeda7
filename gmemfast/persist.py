"""Saving a guest_memfd's state to one ``.npz`` file and reading it back.

A state file is a NumPy ``.npz`` archive: a JSON ``header`` (magic, version, the file's
creation arguments and policies, checksums) and the state arrays. Three SHA-256
checksums guard it, each checked with its own message: ``digest`` over all arrays (the
format's first checksum, still written and checked), ``array_digests`` per array (so a
damaged array is named) and ``header_digest`` over the header itself. A file written
before the last two existed still loads.
"""
from __future__ import annotations

import hashlib
import io
import json
import os

import numpy as np

STATE_MAGIC = "gmemfast-guest-memfd-state"
STATE_VERSION = 2
#: Versions this gmemfast reads: 1 kept the store's bookkeeping at other places of its
#: ``meta`` array (``_store.upgrade_meta`` moves it), 2 is the current one.
READABLE_VERSIONS = (1, 2)
_CHECKSUM_KEYS = ("digest", "array_digests", "header_digest")


class StateFileError(ValueError):
    """A state file that cannot be loaded: damaged, foreign or of another version."""


def _array_digest(name: str, a) -> str:
    a = np.ascontiguousarray(a)
    h = hashlib.sha256()
    h.update(name.encode())
    h.update(str(a.dtype).encode())
    h.update(str(a.shape).encode())
    h.update(a.tobytes())
    return h.hexdigest()


def arrays_digest(arrays: dict) -> str:
    """One checksum over every array (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for k in sorted(arrays):
        a = np.ascontiguousarray(arrays[k])
        h.update(k.encode())
        h.update(str(a.dtype).encode())
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _header_digest(header: dict) -> str:
    body = {k: v for k, v in header.items() if k != "header_digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def save(path, header: dict, arrays: dict) -> None:
    """Write ``header`` and ``arrays`` to ``path`` atomically (a temporary file, then a
    rename), with the magic, version and checksums added to the header."""
    header = {"magic": STATE_MAGIC, "version": STATE_VERSION, **header}
    header["digest"] = arrays_digest(arrays)
    header["array_digests"] = {k: _array_digest(k, a) for k, a in arrays.items()}
    header["header_digest"] = _header_digest(header)
    tmp = f"{os.fspath(path)}.tmp"
    try:
        with open(tmp, "wb") as f:
            np.savez(f, header=np.frombuffer(json.dumps(header).encode(), np.uint8), **arrays)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load(path, names) -> tuple[dict, dict]:
    """Read a state file: ``(header, arrays)`` with the arrays named in ``names``.

    ``FileNotFoundError`` if there is no such file; :class:`StateFileError` (a
    ``ValueError``) saying what is wrong for anything else: not an archive of this
    format, another version, a header or an array that does not match its checksum.
    """
    with open(path, "rb") as f:
        raw = f.read()
    try:
        with np.load(io.BytesIO(raw), allow_pickle=False) as z:
            header = json.loads(bytes(z["header"]).decode())
            arrays = {k: z[k] for k in names}
    except Exception as exc:
        raise StateFileError(f"{path}: not a gmemfast guest_memfd state file ({exc})") from None
    if not isinstance(header, dict) or header.get("magic") != STATE_MAGIC:
        raise StateFileError(f"{path}: not a gmemfast guest_memfd state file (wrong magic)")
    if header.get("version") not in READABLE_VERSIONS:
        raise StateFileError(f"{path}: state version {header.get('version')!r} is not supported "
                             f"(this gmemfast reads versions {', '.join(map(str, READABLE_VERSIONS))})")
    if "header_digest" in header and header["header_digest"] != _header_digest(header):
        raise StateFileError(f"{path}: the header does not match its checksum (damaged file)")
    per_array = header.get("array_digests")
    if per_array is not None:
        if not isinstance(per_array, dict) or set(per_array) != set(names):
            raise StateFileError(f"{path}: the header's array checksums are malformed (damaged file)")
        for k in names:
            if per_array[k] != _array_digest(k, arrays[k]):
                raise StateFileError(f"{path}: array {k!r} does not match its checksum (damaged file)")
    if header.get("digest") != arrays_digest(arrays):
        raise StateFileError(f"{path}: state file is damaged (checksum mismatch)")
    return {k: v for k, v in header.items() if k not in _CHECKSUM_KEYS}, arrays
