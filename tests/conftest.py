"""Shared fixtures and helpers: run the real CLI in a temporary directory, offline; keep the tiers honest.

Two tiers: `python -m pytest -m "not slow"` is the fast inner loop (science and units, in-process);
everything that starts a process -- the CLI, a notebook kernel, a server -- is marked `slow`, and a test
that starts one without the mark fails (see `_refuse_processes_outside_the_slow_tier`).
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import runpy
import subprocess
import sys
import tempfile
import traceback
import warnings
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]

# matplotlib builds its font cache on first use by running fc-list: do it here, before the tier audit
# hook below is installed, so a fresh machine's first plotting test is not taken for one starting a process.
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.font_manager  # noqa: E402, F401

# Under pytest-xdist (pyproject.toml's addopts) every core runs a worker: each gets its share of the cores
# as intra-op threads (one on the 2-core CI machine), else the workers' threads contend for the cores.
if os.environ.get("PYTEST_XDIST_WORKER_COUNT"):
    torch.set_num_threads(max(1, len(os.sched_getaffinity(0)) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])))

# Tiny, fast settings shared by end-to-end tests (seconds per run on 2 CPU cores).
TINY = [
    "training=quick", "progress=false", "model.context_dim=32", "model.embed_dim=24",
    "tokenizer.vocab_size=512", "data.num_conversations=300",
]


# ----------------------------------------------------------------------------- the device
def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--device", default="cpu",
                     help="where the tests that take the `device` fixture (marker `device`) run: cpu (default), "
                          "cuda or cuda:N (benchmarks/gpu_check.sh runs them with --device cuda)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "device: takes the --device option through the `device` fixture "
                                       "(added automatically; `-m device` selects the tests a GPU check runs)")
    name = config.getoption("--device")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", name):
        raise pytest.UsageError(f"--device={name} is not allowed: cpu, cuda or cuda:N")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise pytest.UsageError(f"--device={name}: no CUDA device here (torch {torch.__version__})")
    _make_groups_file(config)


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by markers
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:  # the marker follows the fixture: a test cannot take the device and escape `-m device`
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture
def device(request: pytest.FixtureRequest) -> torch.device:
    """The --device option: the tests that take it build their models and tensors there."""
    return torch.device(request.config.getoption("--device"))


# ----------------------------------------------------------------------------- tiers
_guarded: list[pytest.Item] = []  # the test being set up or run (teardown may stop a server it did not start)


@contextmanager
def _guarding(item: pytest.Item) -> Iterator[None]:
    _guarded.append(item)
    try:
        yield
    finally:
        _guarded.remove(item)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    with _guarding(item):
        yield


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    with _guarding(item):
        yield


def _refuse_processes_outside_the_slow_tier(event: str, args: tuple) -> None:
    """Audit hook: starting a process (python -m newllm.*, a kernel, a server) is what makes a test slow,
    so a test that does it without `@pytest.mark.slow` fails before the process starts."""
    if event != "subprocess.Popen" or not _guarded or _guarded[-1].get_closest_marker("slow") is not None:
        return
    argv = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    pytest.fail(f"{_guarded[-1].nodeid} starts a process ({' '.join(map(str, argv))[:120]}) but is not marked "
                "slow: add @pytest.mark.slow (or pytestmark = pytest.mark.slow for a module of CLI tests)",
                pytrace=False)


sys.addaudithook(_refuse_processes_outside_the_slow_tier)


# ----------------------------------------------------------------------------- parallel workers (pytest-xdist)
# pyproject.toml runs the suite as `-n auto`: tests go to whichever worker is free, except that a test using a
# module-, class- or session-scoped fixture of tests/ (an outputs/ folder built by real sweeps, a study, a
# PostgreSQL server) goes to the worker that builds that fixture instance, so each is built once per run. Tests linked
# through several such fixtures (a notebook test reads analysis_outputs and compare_outputs), or marked
# `xdist_group(name)` alike, form one group. A new shared fixture needs nothing more: its tests inherit this.
#
# Why not xdist's own `--dist loadgroup`: it tags each test by rewriting item._nodeid, which pytest 9.2 no
# longer reads (nodeid comes from item._id), so every group is silently ignored. Here the workers, which
# collect, write the groups to a file; the controller's scheduler (xdist's LoadScopeScheduling, public
# through the pytest_xdist_make_scheduler hook) reads it: a group is one work unit, any other test its own.
SHARED_SCOPES = ("session", "package", "module", "class")
GROUPS_FILE = "NEWLLM_XDIST_GROUPS"  # environment variable naming the file, set by the controller


def _shared_fixtures(item: pytest.Item) -> list[str]:
    """The instances of module/class/package/session-scoped fixtures defined under tests/ that this test
    uses (a module-scoped fixture is one instance per module: `postgres@tests/test_sweeps.py`), and its
    explicit xdist_group marks."""
    info = getattr(item, "_fixtureinfo", None)
    path, *rest = item.nodeid.split("::")
    instance = {"session": "", "package": f"@{Path(path).parent}", "module": f"@{path}",
                "class": f"@{'::'.join([path, *rest[:-1]])}"}
    names = [] if info is None else [
        name + instance[defs[-1].scope] for name, defs in info.name2fixturedefs.items()
        if defs and defs[-1].scope in SHARED_SCOPES and defs[-1].baseid.startswith("tests")]
    marks = [f"group:{m.args[0] if m.args else m.kwargs.get('name', 'default')}"
             for m in item.iter_markers("xdist_group")]
    return sorted([*names, *marks])


def xdist_groups(items: list[pytest.Item]) -> dict[str, str]:
    """nodeid -> group name: the tests connected through shared fixtures (union-find over fixture names),
    each group named by its fixtures, sorted, so that every worker names it alike."""
    parent: dict[str, str] = {}

    def root(name: str) -> str:
        while parent.setdefault(name, name) != name:
            name = parent[name]
        return name

    used = {item.nodeid: _shared_fixtures(item) for item in items}
    for names in used.values():
        for name in names:
            parent[root(name)] = root(names[0])
    members: dict[str, list[str]] = {}
    for name in list(parent):
        members.setdefault(root(name), []).append(name)
    label = {name: "+".join(sorted(members[root(name)])) for name in parent}
    return {nodeid: label[names[0]] for nodeid, names in used.items() if names}


def _make_groups_file(config: pytest.Config) -> None:
    """In the controller of a parallel run (pytest_configure): a file for the groups, named in the
    environment the workers it starts inherit."""
    if config.getoption("numprocesses", None) and not os.environ.get("PYTEST_XDIST_WORKER"):
        fd, path = tempfile.mkstemp(prefix="newllm-xdist-groups-", suffix=".json")
        os.close(fd)
        os.environ[GROUPS_FILE] = path
        config.add_cleanup(lambda: Path(path).unlink(missing_ok=True))


@pytest.hookimpl(tryfirst=True)  # after -m / -k deselection, before the worker reports its collection
def pytest_collection_finish(session: pytest.Session) -> None:
    if os.environ.get("PYTEST_XDIST_WORKER") and os.environ.get(GROUPS_FILE):
        target = Path(os.environ[GROUPS_FILE])
        temp = target.with_name(f"{target.name}.{os.environ['PYTEST_XDIST_WORKER']}")
        temp.write_text(json.dumps(xdist_groups(session.items)))
        os.replace(temp, target)  # every worker writes the same groups: whichever lands last is complete


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # optional: a machine without pytest-xdist runs -o addopts=-ra
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    if config.getvalue("dist") != "load":  # an explicit --dist=<mode> keeps xdist's own scheduler
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedFixtureScheduling(LoadScopeScheduling):
        """Load balancing by test, except that a group of tests sharing fixtures is one unit (and, as
        LoadScopeScheduling orders units by size, groups start first)."""

        groups: dict[str, str] | None = None

        def _split_scope(self, nodeid: str) -> str:
            if self.groups is None:
                text = Path(os.environ[GROUPS_FILE]).read_text() if os.environ.get(GROUPS_FILE) else ""
                self.groups = json.loads(text) if text else {}
            return f"group:{self.groups[nodeid]}" if nodeid in self.groups else nodeid

    return SharedFixtureScheduling(config, log)


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: intra-op threads only add synchronisation cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the CLI
CLI_ENV = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}  # every CLI run of the tests is offline


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread: tiny CLI runs on a busy 2-core box are ~3x faster without thread contention.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(CLI_ENV, PYTHONUNBUFFERED="1",
               PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    return env


def run_cli(args: list[str], cwd: Path, module: str = "newllm.run", timeout: int = 600,
            check: bool = True, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`python -m module args` in cwd (offline, one thread; `env` adds variables)."""
    proc = subprocess.run([sys.executable, "-m", module, *args], cwd=cwd, env={**cli_env(), **(env or {})},
                          capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{module} {args} exited {proc.returncode}\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


# ----------------------------------------------------------------------------- the CLI in-process
# A test that checks what a run writes or which one-line error a bad value gives does not need a new
# interpreter: `run_in_process` runs the same entry point (`python -m <module>` is runpy.run_module as
# __main__) in the test's process and returns what `run_cli` returns, sparing the ~3 s of CPU each start
# spends importing torch, Hydra, pandas and datasets. Real processes stay for what only a process shows:
# the exit status itself (tests/test_errors_cli.py compares the two), signals, servers, notebooks, and
# multirun/sweeper machinery (launchers start workers).

# The warning filters of a fresh interpreter (Python 3.11, no -W): a process prints these warnings on stderr.
FRESH_WARNING_FILTERS = [("default", DeprecationWarning, "__main__"), ("ignore", DeprecationWarning, ""),
                         ("ignore", PendingDeprecationWarning, ""), ("ignore", ImportWarning, ""),
                         ("ignore", ResourceWarning, "")]


def _show_on_stderr(message, category, filename, lineno, file=None, line=None) -> None:
    sys.stderr.write(warnings.formatwarning(message, category, filename, lineno, line))


@contextmanager
def _as_a_fresh_process(argv: list[str], cwd: Path, env: dict[str, str]) -> Iterator[None]:
    """The state a new `python -m` process would start from, put back as it was afterwards: argv, working
    directory, environment, one intra-op thread (cli_env's OMP_NUM_THREADS=1), the global RNGs, a fresh
    interpreter's warning filters, no Hydra instance; and what the process's exit would have released: the
    logging handlers Hydra installed (run.log) and the run folders' flock descriptors of a run that failed
    before Hydra's on_run_end (newllm.runtime.rundirs.hold)."""
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    saved_argv, saved_cwd, saved_env = sys.argv, os.getcwd(), dict(os.environ)
    saved_threads, saved_rng, saved_py_rng = torch.get_num_threads(), torch.get_rng_state(), random.getstate()
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_hydra_cfg, fds_before = HydraConfig.instance().cfg, set(os.listdir("/proc/self/fd"))
    GlobalHydra.instance().clear()
    sys.argv = argv
    os.chdir(cwd)
    os.environ.update(env)
    torch.set_num_threads(1)
    try:
        with warnings.catch_warnings():
            warnings.resetwarnings()
            for action, category, module in reversed(FRESH_WARNING_FILTERS):
                warnings.filterwarnings(action, category=category, module=module)
            warnings.showwarning = _show_on_stderr
            yield
    finally:
        for handler in root.handlers:
            if handler not in saved_handlers:
                handler.close()
        root.handlers[:], root.level = saved_handlers, saved_level
        for fd in set(os.listdir("/proc/self/fd")) - fds_before:
            try:
                if os.path.isdir(os.readlink(f"/proc/self/fd/{fd}")):
                    os.close(int(fd))
            except OSError:  # the descriptor listdir itself used
                pass
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = saved_hydra_cfg
        torch.set_num_threads(saved_threads)
        torch.set_rng_state(saved_rng)
        random.setstate(saved_py_rng)
        os.environ.clear()
        os.environ.update(saved_env)
        os.chdir(saved_cwd)
        sys.argv = saved_argv


def _repoint_log_handlers(moved: dict) -> None:
    """A library imported during the capture may have made a handler on the capture's stream (Optuna's on
    sys.stderr): it writes where the test process's own output goes from now on, not into a closed file."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for handler in (h for lg in loggers for h in lg.handlers):
        # (logging.lastResort's stream is a property: it always writes to the current sys.stderr)
        if isinstance(handler, logging.StreamHandler) and not isinstance(type(handler).__dict__.get("stream"),
                                                                          property) and handler.stream in moved:
            handler.setStream(moved[handler.stream])


@contextmanager
def _captured_output(out: dict[str, str]) -> Iterator[None]:
    """stdout and stderr at the file-descriptor level, as a child's pipes would carry them: print, logging and
    writes from C alike. Filled into `out` on exit."""
    with ExitStack() as stack:
        files = [stack.enter_context(tempfile.TemporaryFile()) for _ in range(2)]
        sys.stdout.flush()
        sys.stderr.flush()
        saved_fds, saved_streams = [os.dup(1), os.dup(2)], (sys.stdout, sys.stderr)
        for fd, file in zip((1, 2), files, strict=True):
            os.dup2(file.fileno(), fd)
        streams = [open(fd, "w", buffering=1, encoding="utf-8", closefd=False) for fd in (1, 2)]  # noqa: SIM115
        sys.stdout, sys.stderr = streams
        try:
            yield
        finally:
            _repoint_log_handlers(dict(zip(streams, saved_streams, strict=True)))
            for stream in streams:
                stream.close()
            sys.stdout, sys.stderr = saved_streams
            for fd, saved in zip((1, 2), saved_fds, strict=True):
                os.dup2(saved, fd)
                os.close(saved)
            for name, file in zip(("stdout", "stderr"), files, strict=True):
                file.seek(0)
                out[name] = file.read().decode("utf-8", errors="replace")


def run_in_process(args: list[str], cwd: Path, module: str = "newllm.run", check: bool = True,
                   env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`run_cli` without a new interpreter: `module` runs as __main__ in this process (runpy, as `python -m`
    does), its exit status is the SystemExit it raised (0 if none; 1 and a traceback for an exception that
    escaped, as the interpreter does), its output what it wrote to stdout and stderr."""
    out: dict[str, str] = {}
    returncode = 0
    # As in a new process, the module is not imported yet (runpy warns on stderr if it is, as after
    # test_layout imported every module); the test process keeps its own copy afterwards.
    imported = sys.modules.pop(module, None)
    with _captured_output(out), _as_a_fresh_process([module, *args], cwd, {**CLI_ENV, **(env or {})}):
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            if stop.code is None or isinstance(stop.code, int):
                returncode = stop.code or 0
            else:  # sys.exit("message"): the interpreter prints it and exits 1
                print(stop.code, file=sys.stderr)
                returncode = 1
        except Exception:  # noqa: BLE001 -- what the interpreter does with an uncaught exception
            traceback.print_exc()
            returncode = 1
        finally:
            sys.modules.pop(module, None)
            if imported is not None:
                sys.modules[module] = imported
    proc = subprocess.CompletedProcess([sys.executable, "-m", module, *args], returncode, out["stdout"],
                                       out["stderr"])
    if check and returncode != 0:
        raise AssertionError(f"{module} {args} exited {returncode} (in-process)\n--- stderr ---\n{proc.stderr[-4000:]}")
    return proc


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below root (relative path -> size, mtime): equal snapshots = nothing written."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")] if p.exists()}


@pytest.fixture
def tiny_run(tmp_path: Path):
    """Run newllm.run's entry point with TINY settings into tmp_path/<name>, in-process (run_in_process);
    returns the run dir and what a process would have given (exit status, stdout, stderr)."""

    def _run(name: str = "run", *overrides: str, check: bool = True):
        run_dir = tmp_path / name
        proc = run_in_process([*TINY, f"hydra.run.dir={run_dir}", f"paths.output_root={tmp_path / 'outputs'}",
                               *overrides], cwd=tmp_path, check=check)
        return run_dir, proc

    return _run


# ----------------------------------------------------------------------------- outputs for the analysis tests
# Even smaller than TINY (context_dim is swept): a job takes ~1-2 s, so a grid, a failing run and two
# studies fit in ~30 s.
FAST = [*(o for o in TINY if not o.startswith("model.context_dim=")), "training.phase1.max_iterations=3",
        "training.phase2.max_steps_per_epoch=3", "training.phase2.max_val_tokens=512"]
STUDY_PARAMS = ["model.context_dim=choice(16,32)", "training.dist_reg_weight=interval(0.0,1.0)"]


@pytest.fixture(scope="session")
def analysis_outputs(tmp_path_factory) -> dict:
    """A real outputs/ folder: a 4-job grid (sequential/layerwise x context_dim 16/32), a single run that
    failed, and two 4-trial Optuna studies (official sweeper, SQLite) whose trials are runs too."""
    tmp = tmp_path_factory.mktemp("analysis")
    out = tmp / "outputs"
    common = [*FAST, f"paths.output_root={out}"]
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")  # one thread per tiny job: 3x faster on a shared, loaded 2-core box
        _make_analysis_outputs(tmp, out, common)
    return {"tmp": tmp, "outputs": out, "storage": f"sqlite:///{out}/optuna.db", "grid": "multirun/grid",
            "crashed": "runs/crashed", "studies": ["sequential", "layerwise"]}


def _make_analysis_outputs(tmp: Path, out: Path, common: list[str]) -> None:
    run_cli(["-m", *common, "model=sequential,layerwise", "model.context_dim=16,32",
             f"hydra.sweep.dir={out}/multirun/grid"], cwd=tmp)
    failed = run_cli([*common, "model.context_dim=-4", f"hydra.run.dir={out}/runs/crashed"], cwd=tmp, check=False)
    assert failed.returncode == 2, failed.stderr
    storage = f"sqlite:///{out}/optuna.db"
    for arch in ("sequential", "layerwise"):
        run_cli(["-m", *common, f"model={arch}", "hydra/sweeper=optuna", "hydra.sweeper.n_trials=4",
                 "hydra.sweeper.direction=[maximize,minimize]", f"hydra.sweeper.storage={storage}",
                 f"hydra.sweeper.study_name={arch}", "hydra.sweeper.sampler.seed=0", *STUDY_PARAMS,
                 f"hydra.sweep.dir={out}/multirun/study_{arch}"], cwd=tmp)


# +sweep=compare_models_quick, smaller still: 1 trial per model, best re-run with seeds 1 and 2 (12 runs).
COMPARE_QUICK = ["+sweep=compare_models_quick", "hydra.sweeper.n_trials=1", "hydra.sweeper.rerun_best.seeds=[1,2]"]


@pytest.fixture(scope="session")
def compare_outputs(tmp_path_factory) -> Path:
    """The sweep folder of a real compare_models run (4 models) through `python -m newllm.run -m`."""
    tmp = tmp_path_factory.mktemp("compare")
    sweep_dir = tmp / "outputs" / "sweeps" / "compare"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OMP_NUM_THREADS", "1")
        proc = run_cli(["-m", *COMPARE_QUICK, f"paths.output_root={tmp / 'outputs'}",
                        f"hydra.sweep.dir={sweep_dir}"], cwd=tmp)
    (tmp / "sweep.log").write_text(proc.stdout + proc.stderr)  # the sweeper's own log, for tests that read it
    return sweep_dir


# ----------------------------------------------------------------------------- a PostgreSQL server (sweeps, SLURM)
def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Postgres:
    """A private PostgreSQL server on 127.0.0.1 whose TCP connections need a password, as a shared one does."""

    port: int
    password: str
    user: str = "newllm"
    database: str = "postgres"

    def url(self, password: str = "") -> str:
        secret = f":{password}" if password else ""
        return f"postgresql+psycopg://{self.user}{secret}@127.0.0.1:{self.port}/{self.database}"


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    """initdb + pg_ctl as a non-root user; scram-sha-256 for host connections (trust only on its own Unix
    socket, which nothing here uses); stopped and deleted afterwards."""
    import glob
    import secrets
    import shutil
    import tempfile

    bins = sorted(glob.glob("/usr/lib/postgresql/*/bin"))
    initdb = shutil.which("initdb") or (bins and f"{bins[-1]}/initdb")
    if not initdb:
        pytest.skip("PostgreSQL server not installed (Debian: apt-get install postgresql; .ci/run does this)")
    pg_ctl = str(Path(initdb).with_name("pg_ctl"))
    root = Path(tempfile.mkdtemp(prefix="newllm-pg-"))
    server = Postgres(port=free_port(), password=f"pw-{secrets.token_hex(12)}")
    (root / "pwfile").write_text(server.password + "\n")
    as_user: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        for path in (root, root / "pwfile"):
            shutil.chown(path, "postgres")
        as_user = ["runuser", "-u", "postgres", "--"]
    data = root / "data"
    subprocess.run([*as_user, initdb, "-D", str(data), "-U", server.user, f"--pwfile={root / 'pwfile'}",
                    "--auth-local=trust", "--auth-host=scram-sha-256"], check=True, capture_output=True)
    (root / "pwfile").unlink()
    opts = f"-p {server.port} -k {root} -c listen_addresses=127.0.0.1 -c max_connections=80"
    subprocess.run([*as_user, pg_ctl, "-D", str(data), "-o", opts, "-l", str(root / "log"), "-w", "start"],
                   check=True, capture_output=True)
    try:
        yield server
    finally:
        subprocess.run([*as_user, pg_ctl, "-D", str(data), "-m", "immediate", "stop"], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)
