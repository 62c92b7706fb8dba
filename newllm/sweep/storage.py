"""Optuna storage URLs as newllm records and shows them: passwords masked, one folder name per storage.

Hydra writes the sweeper's settings and the command-line overrides into every job's .hydra/hydra.yaml
*as written* (interpolations unresolved). A database password is therefore safe only when the written
form does not hold it: libpq's PGPASSWORD, ~/.pgpass or PGSERVICE (the URL has no password at all), or
an interpolation such as `postgresql+psycopg://user:${oc.env:NEWLLM_DB_PASSWORD}@host/optuna`, resolved
in each process that connects. Whatever newllm writes or logs itself shows `masked(url)`.

`create_study` opens a study when many sweep workers start on one fresh database (PostgreSQL or SQLite)
at the same moment.
"""

from __future__ import annotations

import hashlib
import os
import random
import re
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from omegaconf import DictConfig, OmegaConf
from sqlalchemy.engine import URL, make_url
from sqlalchemy.exc import ArgumentError, DBAPIError, IntegrityError, OperationalError, ProgrammingError

from newllm.errors import ConfigError

if TYPE_CHECKING:
    import optuna

MASK = "***"
# libpq fills these in when a URL leaves host or database out (postgresql+psycopg:// with PGSERVICE=...).
LIBPQ_DEFAULTS = ("PGSERVICE", "PGHOST", "PGHOSTADDR", "PGPORT", "PGDATABASE")
_INTERPOLATION = re.compile(r"\$\{[^${}]*\}")
# How PostgreSQL fails the losers of a race to create one schema: unique_violation (on pg_type, when the
# CREATE TYPEs overlap), duplicate_object (a type the winner committed after this one checked for it),
# duplicate_table. SQLite has no SQLSTATE: "table studies already exists", "database is locked", or an
# IntegrityError on alembic_version / version_info.
SCHEMA_RACE_SQLSTATES = frozenset({"23505", "42710", "42P07"})
SQLITE_RACE_MESSAGES = ("already exists", "database is locked")


def _parse(url: str) -> URL | None:
    try:
        return make_url(url)
    except (ArgumentError, ValueError):
        return None


def _userinfo_password(url: str) -> str | None:
    """The password of scheme://user:PASSWORD@host/..., read without a URL parser: written unescaped, an '@' in it
    makes parsers take part of it for the host, and a '/' makes them fail; it is a password all the same."""
    _, sep, rest = url.partition("://")
    userinfo = rest.rsplit("@", 1)[0] if sep and "@" in rest else ""
    return userinfo.split(":", 1)[1] or None if ":" in userinfo else None


def password(url: str | None) -> str | None:
    """The password a URL carries (user:PASSWORD@host, or ?password=), else None."""
    if not url:
        return None
    parsed = _parse(url)
    if parsed is not None and parsed.query.get("password"):
        return parsed.query["password"]  # type: ignore[return-value]
    return _userinfo_password(url)


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


def _strings(node: Any) -> list[str]:
    """Every string in a config tree (an override 'key=value' also as its value)."""
    if isinstance(node, dict):
        return [s for v in node.values() for s in _strings(v)]
    if isinstance(node, list):
        return [s for v in node for s in _strings(v)]
    if isinstance(node, str):
        return [node, node.split("=", 1)[1]] if "=" in node else [node]
    return []


def check_not_written(config: DictConfig) -> None:
    """Refuse a storage URL whose password Hydra would write down, for any sweeper (newllm_optuna, the official
    optuna one, any other with a `storage`): Hydra saves the config as written into every .hydra/, and sweepers
    log it. Written means literally in the storage setting, or in another key it interpolates (the password, or
    a URL holding it). The message shows the URL's scheme only: nothing of the password, however it is spelt
    (an '@' in it makes any parser split it into user, host and password wrongly)."""
    sweeper = config.hydra.get("sweeper") if "hydra" in config else None
    if not isinstance(sweeper, DictConfig) or "storage" not in sweeper:
        return
    written = OmegaConf.to_container(sweeper, resolve=False).get("storage")
    try:
        resolved = sweeper.storage
    except Exception:  # noqa: BLE001 -- e.g. ${oc.env:...} unset here: judged on the written form alone
        resolved = None
    secret = password(str(resolved)) if resolved else None
    everything = _strings(OmegaConf.to_container(config, resolve=False))
    leaked = literal_password(written if isinstance(written, str) else None) or bool(secret) and any(
        text == secret or ("://" in text and password(text) == secret) for text in everything)
    if leaked:
        scheme = re.match(r"[A-Za-z][A-Za-z0-9+.-]*(?=://)", str(written or resolved or ""))
        example = f"{scheme.group(0) if scheme else 'postgresql+psycopg'}://USER:${{oc.env:NEWLLM_DB_PASSWORD}}@HOST/DB"
        raise ConfigError("hydra.sweeper.storage holds a password, which Hydra would write into .hydra/ of every "
                          "job (and sweepers log it): leave it out (PGPASSWORD, ~/.pgpass or PGSERVICE) or write it "
                          f"as {example}")


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


def schema_race(exc: BaseException) -> bool:
    """Whether a database error is another process creating the same (Optuna) schema at this moment."""
    if isinstance(exc, IntegrityError):
        return True
    if isinstance(exc, OperationalError) and type(exc.orig).__module__.startswith("sqlite3"):
        return any(text in str(exc.orig) for text in SQLITE_RACE_MESSAGES)
    return isinstance(exc, ProgrammingError) and getattr(exc.orig, "sqlstate", None) in SCHEMA_RACE_SQLSTATES


def create_study(attempts: int = 6, **kwargs: Any) -> optuna.Study:
    """optuna.create_study(load_if_exists=True, **kwargs), trying again while other workers create the schema.

    Optuna creates its tables with SQLAlchemy's check-then-create, which is not atomic: of several
    processes starting on a fresh database at once, one wins and the others fail. Trying again sees the
    schema the winner made (the jitter keeps the losers from colliding a second time); any other error,
    or a race still lost after `attempts`, is raised."""
    import optuna  # imported here: config.py imports this module while composing, and optuna is heavy

    for attempt in range(1, attempts):
        try:
            return optuna.create_study(load_if_exists=True, **kwargs)
        except DBAPIError as exc:
            if not schema_race(exc):
                raise
            time.sleep(0.2 * attempt + random.random() * 0.3)
    return optuna.create_study(load_if_exists=True, **kwargs)  # the last attempt raises whatever it meets
