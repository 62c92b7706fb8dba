"""Shared fixtures and helpers: run the real CLI in a temporary directory, offline; keep the tiers honest.

Two tiers: `python -m pytest -m "not slow"` is the fast inner loop (science and units, in-process);
everything that starts a process -- the CLI, a notebook kernel, a server -- is marked `slow`, and a test
that starts one without the mark fails (see `_refuse_processes_outside_the_slow_tier`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


@pytest.fixture
def one_thread() -> Iterator[None]:
    """Tiny models on a shared 2-core machine: intra-op threads only add synchronisation cost."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- the CLI
def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    # One intra-op thread: tiny CLI runs on a busy 2-core box are ~3x faster without thread contention.
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", PYTHONUNBUFFERED="1",
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


def read_metrics(run_dir: Path) -> dict:
    return json.loads((run_dir / "metrics.json").read_text())


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file and folder below root (relative path -> size, mtime): equal snapshots = nothing written."""
    return {p.relative_to(root).as_posix(): (p.stat().st_size if p.is_file() else -1, p.stat().st_mtime_ns)
            for p in [root, *root.rglob("*")] if p.exists()}


@pytest.fixture
def tiny_run(tmp_path: Path):
    """Run `python -m newllm.run` with TINY settings into tmp_path/<name>; returns the run dir."""

    def _run(name: str = "run", *overrides: str, check: bool = True):
        run_dir = tmp_path / name
        proc = run_cli([*TINY, f"hydra.run.dir={run_dir}", f"paths.output_root={tmp_path / 'outputs'}",
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
