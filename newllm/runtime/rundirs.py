"""Run folders: every run claims a folder of its own before Hydra writes anything into it.

`RunFolders` is a Hydra callback (conf/config.yaml, hydra.callbacks). Its hooks run after the config
is composed and before Hydra makes the run folder and writes .hydra/ and run.log into it. One rule covers
every folder Hydra names: a process writes only into a folder it claimed, or into the run it resumes.
  - a run claims hydra.run.dir, a multirun claims hydra.sweep.dir. A folder can be claimed when it is new
    or empty and lies inside no other run's or sweep's folder (`foreign_owner`); the claim is one atomic
    create of what Hydra writes there first (.hydra/ in a run folder, multirun.yaml in a sweep folder), so
    of two processes started at the same instant exactly one gets it.
  - job folders (hydra.sweep.subdir) and Hydra's own files (hydra.output_subdir) are relative paths that
    stay inside the folder claimed, and a job folder's name holds ${hydra.job.num} or ${hydra.job.id}, so
    no two jobs share one (`check_inside`).
  - a taken folder whose name comes from a timestamped pattern (${now:...}, as both defaults are) is
    de-duplicated: <name>_1, <name>_2, ...; a fixed name (hydra.run.dir=outputs/phase1/base) is refused
    with one line naming it.
  - the newllm_optuna sweeper keeps one folder per study on purpose (its job folders are per trial,
    and a re-run continues the study there), so its sweep folder is not claimed.
  - resume=<run dir> continues in that run's folder: it is validated here, so a refusal writes nothing,
    and refused while another process still runs in that folder (each run holds a lock on its folder);
    hydra.run.dir, if given, must name that same folder.
"""

from __future__ import annotations

import fcntl
import logging
import os
from pathlib import Path, PurePosixPath
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.types import Quote, QuotedString
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf, read_write

from newllm.errors import ConfigError, NewllmError, RunFolderError, exit_one_line
from newllm.runtime import checkpoint as ckpt

log = logging.getLogger(__name__)
MAX_SUFFIX = 1000
RESUME_OVERRIDABLE = ("resume=", "device=", "progress=", "hydra.", "paths.")
OWNER_FILE = ".newllm-owner.json"  # newllm_optuna: in its sweep folder and each job folder, which study owns it
# What marks a folder as a run's or a sweep's: Hydra's .hydra/ (run and job folders), Hydra's multirun.yaml
# (a grid's sweep folder), the newllm_optuna sweeper's owner record.
OWNED_MARKS = (".hydra", "multirun.yaml", OWNER_FILE)
JOB_UNIQUE = ("hydra.job.num", "hydra.job.id")  # what makes hydra.sweep.subdir differ from job to job


def foreign_owner(folder: Path) -> Path | None:
    """The nearest folder above `folder` that belongs to a run or a sweep (it holds one of OWNED_MARKS), if any:
    a new run made there would write into a folder another run owns (its checkpoints/, its job folders)."""
    for parent in Path(folder).resolve().parents:
        if any((parent / mark).exists() for mark in OWNED_MARKS):
            return parent
    return None


def check_outside_others(key: str, folder: str) -> None:
    """A new run or sweep folder lies inside no other run's or sweep's folder."""
    owner = foreign_owner(Path(folder))
    if owner is not None:
        raise RunFolderError(f"{key}={folder!r} lies inside {str(owner)!r}, which belongs to another run or sweep: "
                             "a run needs a folder of its own, outside every other run's; choose another")


def check_inside(key: str, written: Any, unique: bool = False) -> None:
    """A folder Hydra makes below a claimed one (hydra.sweep.subdir, hydra.output_subdir), as written: a relative
    path without '..', so it stays inside; with `unique`, also one that differs from job to job."""
    if written is None:
        return
    text = str(written)
    path = PurePosixPath(text)
    if path.is_absolute() or ".." in path.parts:
        raise ConfigError(f"{key}={text!r} is not allowed: expected a relative path without '..' (it names a "
                          "folder inside the one this command claimed, never another run's)")
    if unique and not any(name in text.replace(" ", "") for name in JOB_UNIQUE):
        raise ConfigError(f"{key}={text!r} is not allowed: expected a name holding ${{hydra.job.num}} (or "
                          "${hydra.job.id}), so that every job gets a folder of its own (e.g. "
                          "${hydra.job.num}_${hydra.job.override_dirname})")


def claim(folder: Path, marker: str) -> bool:
    """Make `folder` this process's if it is new or empty: True when it now is, False when taken.

    Atomic: whoever creates `marker` inside the empty folder first owns it (a directory name ending
    in '/' is made with mkdir, anything else is created as an empty file, both exclusive).
    """
    folder.mkdir(parents=True, exist_ok=True)
    if any(folder.iterdir()):
        return False
    path = folder / marker.rstrip("/")
    try:
        if marker.endswith("/"):
            path.mkdir()
        else:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))
    except FileExistsError:
        return False
    return True


def claim_fresh(key: str, folder: str, pattern: str, marker: str) -> str:
    """The folder this run gets for `key` (hydra.run.dir / hydra.sweep.dir): `folder` itself, or,
    for a timestamped pattern, the first free one of folder_1, folder_2, ..."""
    check_outside_others(key, folder)
    candidates = [folder] + ([f"{folder}_{n}" for n in range(1, MAX_SUFFIX)] if "${now:" in pattern else [])
    for candidate in candidates:
        try:
            if claim(Path(candidate), marker):
                if candidate != folder:
                    log.info("%s %s is taken: this run uses %s", key, folder, candidate)
                return candidate
        except OSError as err:  # a file in the way, no permission...
            raise RunFolderError(f"{key}={candidate!r} cannot be made a run folder ({err.strerror})") from err
    if len(candidates) > 1:
        raise RunFolderError(f"{key}={folder!r} and {MAX_SUFFIX - 1} de-duplicated names are all taken")
    hint = f", or resume={folder} to continue an interrupted run" if key == "hydra.run.dir" else ""
    raise RunFolderError(f"{key}={folder!r} already holds another run or other files: a run needs a new or "
                         f"empty folder; choose another{hint}")


def check_resume_overrides(overrides: list[str]) -> None:
    """resume= continues a run with the config it started with: other overrides would be silently lost."""
    other = [o for o in overrides if not o.lstrip("+~").startswith(RESUME_OVERRIDABLE)]
    if other:
        raise ConfigError(f"resume= continues a run with its own config; drop the overrides {other} "
                          f"(allowed with resume: device, progress, paths.*, hydra.*)")


def check_resume(config: DictConfig) -> None:
    """Everything a resume can be refused for, before Hydra writes .hydra/resume and run.log there."""
    check_resume_overrides(list(config.hydra.overrides.task))
    ckpt.resume_config(config.resume, mmap=True)  # readable and resumable (tensors mapped, not read)
    run_dir = str(config.hydra.run.dir)
    if Path(run_dir).resolve() != Path(config.resume).resolve():  # Hydra would write .hydra/resume, run.log there
        raise ConfigError(f"hydra.run.dir={run_dir!r} is not allowed with resume={config.resume!r}: a resumed run "
                          "writes only into its own folder; drop hydra.run.dir")


def _set(config: DictConfig, node: str, folder: str) -> None:
    with read_write(config.hydra[node]):
        config.hydra[node].dir = folder


def hold(folder: Path) -> int | None:
    """Lock `folder` for as long as this process works in it: the open descriptor holding an exclusive
    flock, or None when another live process holds it. The kernel drops the lock when the process ends,
    however it ends, so a killed run is never left locked."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        return None
    except OSError:  # a filesystem without locks (some NFS mounts): nothing to hold, nothing to refuse
        pass
    return fd


class RunFolders(Callback):
    """Claims the run / sweep folder (or validates resume=) before Hydra writes into it, and holds a lock
    on the run folder while the run goes, so resume= can tell a run that is still running."""

    def __init__(self) -> None:
        self.held: dict[str, int] = {}  # run folder -> its locked descriptor

    def _hold(self, folder: str) -> bool:
        if folder not in self.held:
            fd = hold(Path(folder))
            if fd is None:
                return False
            self.held[folder] = fd
        return True

    def _release(self) -> None:
        for fd in self.held.values():
            os.close(fd)
        self.held.clear()

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            check_inside("hydra.output_subdir", config.hydra.output_subdir)
            if config.get("resume"):
                check_resume(config)
                if not self._hold(str(Path(config.resume).resolve())):
                    raise RunFolderError(f"resume={config.resume!r}: that run is still running (another process "
                                         "holds its folder); resume it once that process has ended")
                return
            pattern = OmegaConf.to_container(config.hydra.run, resolve=False)["dir"]
            folder = claim_fresh("hydra.run.dir", str(config.hydra.run.dir), pattern, ".hydra/")
            self._hold(str(Path(folder).resolve()))  # just claimed: nobody else can hold it
            _set(config, "run", folder)
        except NewllmError as err:
            exit_one_line(err)

    def on_run_end(self, **kwargs: Any) -> None:
        self._release()

    def on_job_start(self, config: DictConfig, **kwargs: Any) -> None:
        """A multirun job (in whichever process the launcher runs it) holds its own folder too."""
        if config.hydra.mode == RunMode.MULTIRUN:
            self._hold(str(Path(config.hydra.runtime.output_dir).resolve()))

    def on_job_end(self, config: DictConfig, **kwargs: Any) -> None:
        if config.hydra.mode == RunMode.MULTIRUN:
            self._release()

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        try:
            if config.get("resume"):
                raise ConfigError(f"resume={config.resume!r} continues one run: drop -m/--multirun")
            check_inside("hydra.output_subdir", config.hydra.output_subdir)
            if "newllm_sweeper" in str(config.hydra.sweeper.get("_target_", "")):
                # It makes each trial's job folder itself (never one that exists) and keeps its sweep folder
                # across re-runs of a study, under an owner record: only where that folder lies is checked here.
                check_outside_others("hydra.sweep.dir", str(config.hydra.sweep.dir))
                return
            subdir = OmegaConf.to_container(config.hydra.sweep, resolve=False)["subdir"]
            check_inside("hydra.sweep.subdir", subdir, unique=True)
            pattern = OmegaConf.to_container(config.hydra.sweep, resolve=False)["dir"]
            folder = claim_fresh("hydra.sweep.dir", str(config.hydra.sweep.dir), pattern, "multirun.yaml")
            _set(config, "sweep", folder)
            # Each job's config is composed again from hydra.overrides.hydra: the claim goes there too.
            quoted = QuotedString(folder, Quote.double).with_quotes()
            with read_write(config.hydra.overrides):
                config.hydra.overrides.hydra.append(f"hydra.sweep.dir={quoted}")
            HydraConfig.instance().set_config(config)  # controller-side ${hydra:sweep.dir} sees the claim
        except NewllmError as err:
            exit_one_line(err)
