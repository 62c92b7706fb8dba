"""Optuna storage URLs as newllm records and shows them: passwords masked, one folder name per storage.

Hydra writes the sweeper's settings and the command-line overrides into every job's .hydra/hydra.yaml
*as written* (interpolations unresolved). A database password is therefore safe only when the written
form does not hold it: libpq's PGPASSWORD, ~/.pgpass or PGSERVICE (the URL has no password at all), or
an interpolation such as `postgresql+psycopg://user:${oc.env:NEWLLM_DB_PASSWORD}@host/optuna`, resolved
in each process that connects. Whatever newllm writes or logs itself shows `masked(url)`.
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
from pathlib import Path

from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError

MASK = "***"
# libpq fills these in when a URL leaves host or database out (postgresql+psycopg:// with PGSERVICE=...).
LIBPQ_DEFAULTS = ("PGSERVICE", "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE")
_INTERPOLATION = re.compile(r"\$\{[^${}]*\}")


def _parse(url: str) -> URL | None:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def password(url: str | None) -> str | None:
    """The password a URL carries (user:PASSWORD@host, or ?password=), else None."""
    parsed = _parse(url) if url else None
    if parsed is None:
        return None
    return parsed.password or parsed.query.get("password") or None  # type: ignore[return-value]


def masked(url: str | None) -> str:
    """The URL with any password replaced by *** ('' for no storage): what newllm records and logs."""
    if not url:
        return ""
    parsed = _parse(url)
    if parsed is None:  # not a URL we can read: show nothing of it that could be a secret
        return "<unparsable storage URL>"
    if password(url) is None:
        return url  # as written (rendering would re-quote it)
    text = parsed.render_as_string(hide_password=True)
    if "password" in parsed.query:
        text = re.sub(r"([?&]password=)[^&]*", rf"\g<1>{MASK}", text)
    return text


def literal_password(written: str | None) -> bool:
    """Whether a storage setting *as written* (before interpolation) holds a password itself."""
    if not written or "://" not in written:  # no storage, or the whole URL comes from an interpolation
        return False
    while _INTERPOLATION.search(written):  # innermost first, so nested interpolations go too
        written = _INTERPOLATION.sub("INTERPOLATED", written)
    secret = password(written)
    return bool(secret) and "INTERPOLATED" not in secret


def absolute_sqlite(url: str | None) -> str | None:
    """sqlite:///rel/path -> sqlite:////abs/path (jobs may run elsewhere); other URLs unchanged."""
    if not url or not str(url).startswith("sqlite:///"):
        return url
    return f"sqlite:///{Path(str(url).removeprefix('sqlite:///')).resolve()}"  # sqlite:////abs keeps its /


def identity(url: str | None) -> str:
    """What a storage is, however it is spelt: the SQLite file, or backend + server + database (+ the
    libpq defaults that fill a URL's gaps). An in-memory storage lives only in this process."""
    if not url:
        return f"in-memory:{socket.gethostname()}:{os.getpid()}"
    parsed = _parse(absolute_sqlite(url) or "")
    if parsed is None:
        return f"unparsable:{hashlib.sha256(url.encode()).hexdigest()}"
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return f"sqlite:{parsed.database}"
    query = sorted((k, str(v)) for k, v in parsed.query.items() if k != "password")
    env = [(k, os.environ[k]) for k in LIBPQ_DEFAULTS if k in os.environ] \
        if backend == "postgresql" and not (parsed.host and parsed.database) else []
    return f"{backend}://{parsed.host or ''}:{parsed.port or ''}/{parsed.database or ''}?{query}{env}"


def folder_name(url: str | None) -> str:
    """A readable folder name unique to one storage, e.g. 'optuna-1f2e3d4c' for sqlite:///outputs/optuna.db.

    Used in the default sweep folders, so one study name in two storages never shares job folders.
    """
    if not url:
        return f"in-memory-{os.getpid()}"
    parsed = _parse(absolute_sqlite(url) or "")
    if parsed is None:
        base = "storage"
    elif parsed.get_backend_name() == "sqlite":
        base = Path(parsed.database or "memory").stem
    else:  # host-database, or the libpq service that names them
        service = parsed.query.get("service") or (None if parsed.host else os.environ.get("PGSERVICE"))
        base = "-".join(p for p in (parsed.host, parsed.database) if p) or str(service or parsed.get_backend_name())
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).strip("._") or "storage"
    return f"{base}-{hashlib.sha256(identity(url).encode()).hexdigest()[:8]}"
