"""newllm.sweep.storage: what newllm records of an Optuna storage URL (passwords masked) and its folder names."""

from __future__ import annotations

from pathlib import Path

import pytest

from newllm.sweep import storage


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://alice:s3cr%40t@db.lab:5432/optuna", "postgresql+psycopg://alice:***@db.lab:5432/optuna"),
    ("postgresql+psycopg://alice@db.lab/optuna?password=s3cr3t&sslmode=require",
     "postgresql+psycopg://alice@db.lab/optuna?password=***&sslmode=require"),
    ("postgresql+psycopg://alice@db.lab/optuna", "postgresql+psycopg://alice@db.lab/optuna"),  # PGPASSWORD/.pgpass
    ("postgresql+psycopg://", "postgresql+psycopg://"),  # PGSERVICE
    ("sqlite:///outputs/optuna.db", "sqlite:///outputs/optuna.db"),
    (None, ""),
])
def test_masked_hides_any_password(url, shown):
    assert storage.masked(url) == shown
    assert "s3cr" not in storage.masked(url)


@pytest.mark.parametrize(("written", "literal"), [
    ("postgresql+psycopg://alice:s3cr3t@db.lab/optuna", True),
    ("postgresql+psycopg://alice@db.lab/optuna?password=s3cr3t", True),
    ("postgresql+psycopg://alice:s3cr3t@${oc.env:DBHOST}/optuna", True),  # the host is interpolated, not the password
    ("postgresql+psycopg://alice:${oc.env:NEWLLM_DB_PASSWORD}@db.lab/optuna", False),
    ("postgresql+psycopg://alice:${oc.env:NEWLLM_DB_PASSWORD,${oc.env:PW2}}@db.lab/optuna", False),  # nested
    ("${oc.env:NEWLLM_STORAGE}", False),  # the whole URL from the environment
    ("postgresql+psycopg://alice@db.lab/optuna", False),
    ("sqlite:///${paths.output_root}/optuna.db", False),
    (None, False),
])
def test_literal_password_is_judged_on_the_written_form(written, literal):
    assert storage.literal_password(written) is literal


def composed(*overrides: str):
    """The run's config as Hydra composes it for a sweep with these overrides (in-process, no run)."""
    from hydra import compose, initialize_config_dir

    import newllm.run  # noqa: F401 -- registers the schemas and resolvers
    from tests.conftest import REPO

    with initialize_config_dir(config_dir=str(REPO / "conf")):
        return compose("config", list(overrides), return_hydra_config=True)


SECRET = "p@ss:w/rd"  # an '@' makes every URL parser put part of it in the host


@pytest.mark.parametrize("overrides", [
    ["hydra/sweeper=optuna", f"hydra.sweeper.storage=postgresql+psycopg://alice:{SECRET}@db.lab/optuna"],
    ["hydra/sweeper=newllm_optuna", f"hydra.sweeper.storage=postgresql+psycopg://alice:{SECRET}@db.lab/optuna"],
    ["hydra/sweeper=optuna", f"hydra.sweeper.storage='postgresql+psycopg://alice@db.lab/optuna?password={SECRET}'"],
    # the URL, or only its password, in another key the storage interpolates: Hydra writes that key too
    ["hydra/sweeper=optuna", f"+db='postgresql+psycopg://alice:{SECRET}@db.lab/optuna'", "hydra.sweeper.storage=${db}"],
    ["hydra/sweeper=optuna", f"+pw='{SECRET}'", "hydra.sweeper.storage=postgresql+psycopg://alice:${pw}@db.lab/optuna"],
], ids=["official", "newllm", "query", "url_in_another_key", "password_in_another_key"])
def test_a_password_hydra_would_write_is_refused_for_any_sweeper_without_showing_it(overrides):
    from newllm.errors import ConfigError

    with pytest.raises(ConfigError) as refused:
        storage.check_not_written(composed(*overrides))
    message = str(refused.value)
    assert message.startswith("hydra.sweeper.storage holds a password") and "postgresql+psycopg://USER:" in message
    assert not any(part in message for part in ("p@ss", "ss:w", "w/rd", "rd@", "alice", "db.lab"))


@pytest.mark.parametrize("overrides", [
    ["hydra/sweeper=optuna", "hydra.sweeper.storage=postgresql+psycopg://alice:${oc.env:NEWLLM_DB_PASSWORD}@db/o"],
    ["hydra/sweeper=optuna", "hydra.sweeper.storage=postgresql+psycopg://alice@db.lab/optuna"],  # PGPASSWORD
    ["hydra/sweeper=newllm_optuna"],  # the default: SQLite under outputs/
    [],  # Hydra's basic sweeper has no storage
])
def test_a_storage_without_a_written_password_passes(overrides, monkeypatch):
    monkeypatch.setenv("NEWLLM_DB_PASSWORD", SECRET)
    storage.check_not_written(composed(*overrides))


def test_folder_names_tell_storages_apart(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    names = {
        storage.folder_name("sqlite:///outputs/optuna.db"),
        storage.folder_name(f"sqlite:///{tmp_path / 'elsewhere' / 'optuna.db'}"),
        storage.folder_name("postgresql+psycopg://alice@db.lab:5432/optuna"),
        storage.folder_name("postgresql+psycopg://alice@db2.lab:5432/optuna"),
        storage.folder_name(None),
    }
    assert len(names) == 5
    # one storage, spelt two ways (relative / absolute path; another user or password): one folder
    assert storage.folder_name("sqlite:///outputs/optuna.db") == \
        storage.folder_name(f"sqlite:///{tmp_path / 'outputs' / 'optuna.db'}")
    assert storage.folder_name("postgresql+psycopg://alice:pw1@db.lab:5432/optuna") == \
        storage.folder_name("postgresql+psycopg://bob@db.lab:5432/optuna")
    assert storage.folder_name("sqlite:///outputs/optuna.db").startswith("optuna-")
    assert storage.folder_name("postgresql+psycopg://alice@db.lab/optuna").startswith("db.lab-optuna-")
    # a URL that leaves the server to libpq (PGSERVICE) is told apart by the service it names
    monkeypatch.setenv("PGSERVICE", "lab")
    lab = storage.folder_name("postgresql+psycopg://")
    monkeypatch.setenv("PGSERVICE", "home")
    assert storage.folder_name("postgresql+psycopg://") != lab and lab.startswith("lab-")
    assert storage.absolute_sqlite("sqlite:///outputs/optuna.db") == f"sqlite:///{Path(tmp_path) / 'outputs/optuna.db'}"


def test_schema_race_is_the_losing_side_of_creating_one_schema_and_nothing_else():
    """What PostgreSQL raises at the workers that lose the race to create Optuna's schema (CI's 4-sweep test
    met DuplicateObject) is retried; a real error such as a missing privilege is not."""
    psycopg = pytest.importorskip("psycopg")  # the postgres extra
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    def wrapped(kind, orig):
        return kind("CREATE TYPE studydirection AS ENUM (...)", {}, orig)

    assert storage.schema_race(wrapped(IntegrityError, psycopg.errors.UniqueViolation("pg_type_typname_nsp_index")))
    assert storage.schema_race(wrapped(ProgrammingError, psycopg.errors.DuplicateObject('"studydirection" exists')))
    assert storage.schema_race(wrapped(ProgrammingError, psycopg.errors.DuplicateTable('"studies" exists')))
    assert not storage.schema_race(wrapped(ProgrammingError, psycopg.errors.InsufficientPrivilege("schema public")))
    assert not storage.schema_race(wrapped(OperationalError, psycopg.errors.ConnectionTimeout("timeout")))
    assert not storage.schema_race(ValueError("not a database error"))
    import sqlite3

    assert storage.schema_race(wrapped(OperationalError, sqlite3.OperationalError("table studies already exists")))
    assert storage.schema_race(wrapped(OperationalError, sqlite3.OperationalError("database is locked")))
    assert not storage.schema_race(wrapped(OperationalError, sqlite3.OperationalError("no such table: studies")))


@pytest.mark.slow
@pytest.mark.parametrize("sweeper", ["optuna", "newllm_optuna"])
def test_a_storage_password_is_refused_before_anything_is_written(tmp_path, sweeper):
    """The official sweeper wrote the URL into <sweep>/0/.hydra/hydra.yaml and logged it ("Storage: ..."); the
    refusal itself printed the part of a password after its '@'."""
    from tests.conftest import TINY, run_cli, tree

    before = tree(tmp_path)
    proc = run_cli(["-m", *TINY, f"hydra/sweeper={sweeper}", f"paths.output_root={tmp_path / 'outputs'}",
                    f"hydra.sweep.dir={tmp_path / 'sweep'}", "objectives=[phase2/val_ppl]",
                    f"hydra.sweeper.storage=postgresql+psycopg://alice:{SECRET}@localhost/optuna"],
                   cwd=tmp_path, check=False)
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith("error: hydra.sweeper.storage holds a password")
    assert not any(part in proc.stdout + proc.stderr for part in ("p@ss", "ss:w", "w/rd", "localhost"))
    assert tree(tmp_path) == before  # nothing written: no sweep folder, no .hydra, no database
