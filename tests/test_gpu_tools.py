"""The GPU check's tooling (benchmarks/gpu_deps.py, gpu_check.sh): what the wheel folder carries, and bad input."""

from __future__ import annotations

import subprocess
from importlib import metadata

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from benchmarks import gpu_deps
from tests.conftest import REPO


def test_the_wheel_folder_carries_newllms_closure_less_the_image_at_this_venvs_versions():
    carry, frontier = gpu_deps.plan("3.12")
    image = gpu_deps.image_packages()
    # what newllm needs that the image lacks, the Hydra plugins and Optuna's own needs included
    for name in ("hydra-core", "omegaconf", "hydra-optuna-sweeper", "hydra-joblib-launcher", "hydra-submitit-launcher",
                 "optuna", "sqlalchemy", "alembic", "mako", "colorlog", "datasets", "dill", "multiprocess",
                 "chatterbot-corpus", "submitit"):
        assert name in carry and name not in image, name
    assert "torch" not in carry and "torch" not in frontier  # the machine's CUDA build, never carried
    env = gpu_deps.marker_env("3.12")
    reqs = gpu_deps.roots(env) + [r for parent in carry for r in gpu_deps.requirements_of(parent, set(), env)]
    for name, version in carry.items():
        assert version == Version(metadata.version(name)), name  # the tested version, one of each
        if name in image:  # carried although the image has it: a requirement its version (or unknown pin) fails
            on_it = [r for r in reqs if canonicalize_name(r.name) == name]
            assert any(not gpu_deps.image_satisfies(r, image[name]) for r in on_it), name
    assert {"numpy", "pyyaml", "tqdm", "packaging", "pytest"} <= set(frontier)  # the image's, not carried
    # reached by a requirement the image meets and by one it fails (tokenizers: ranged by transformers, pinned
    # by newllm): carried; never an image package that no requirement fails
    assert set(carry) & set(frontier) <= {n for n in carry if n in image}
    assert "tokenizers" in carry  # an exact pin the image's 0.23.2 fails
    assert "transformers" not in carry and "huggingface-hub" not in carry  # the image's own (MACHINES_OWN)


def test_an_image_package_meets_a_range_on_trust_but_an_exact_pin_only_by_a_known_version():
    assert gpu_deps.image_satisfies(Requirement("scipy>=1.11"), None)
    assert not gpu_deps.image_satisfies(Requirement("pandas==3.1.1"), None)
    assert not gpu_deps.image_satisfies(Requirement("tokenizers==0.23.3"), Version("0.23.2"))
    assert gpu_deps.image_satisfies(Requirement("huggingface-hub<3.0,>=1.31.0"), Version("1.33.0"))


def test_check_passes_here_and_holds_torch_to_the_images_floor_not_to_the_cpu_pin(capsys):
    assert gpu_deps.check() == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if " torch " in ln)
    assert line.startswith("ok") and metadata.version("torch") in line


@pytest.mark.slow
@pytest.mark.parametrize(("args", "message"), [
    (["--device", "tpu"], "--device=tpu is not allowed: cpu, cuda or cuda:N"),
    (["--wheels", "/nonexistent"], "--wheels=/nonexistent holds no .whl files: run benchmarks/gpu_wheels.sh"),
    (["--budget", "soon"], "--budget=soon: whole seconds"),
])
def test_gpu_check_refuses_bad_options_in_one_line_before_any_work(tmp_path, args, message):
    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), *args, "--out", str(tmp_path / "o")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"gpu_check.sh: {message} (see the header of benchmarks/gpu_check.sh)"
    assert not (tmp_path / "o").exists()  # refused before the output folder was made
