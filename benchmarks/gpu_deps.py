"""newllm's dependency closure, for the GPU machines (benchmarks/gpu_wheels.sh, benchmarks/gpu_check.sh).

    python benchmarks/gpu_deps.py plan [--python-version 3.12]   # what the wheel folder must hold
    python benchmarks/gpu_deps.py image [--python-version 3.12]  # the image's packages the walk stops at
    python benchmarks/gpu_deps.py check                          # does THIS interpreter satisfy newllm?

`plan` walks newllm's requirements (as installed in this venv: its metadata, pins included) plus pytest,
with markers evaluated for the target Python on x86-64 Linux. A requirement the GPU image already
satisfies (benchmarks/gpu_image.txt, from the device docs: names, and versions where they were read;
an exact pin is met only by a version read there) ends the walk: its own needs are the image's business.
Any other one is carried, at the version installed here (the one newllm is tested with), and its own
requirements are walked in turn. Prints `name==version`, one a line, sorted. torch and transformers are never
carried (MACHINES_OWN: `check` holds them to the GPU image's floors, not to pyproject's pins).

`check` walks the same closure in the running interpreter (the GPU machine's python3 with the wheel
folder on PYTHONPATH) and prints one line per package: version, and whether it meets every requirement
that reaches it. Exit 1 if one is missing or fails a requirement, so a stale or incomplete wheel folder
is the first failed step of gpu_check.sh, with the package named.
"""

from __future__ import annotations

import argparse
import sys
from importlib import metadata
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

HERE = Path(__file__).resolve().parent
IMAGE = HERE / "gpu_image.txt"
ROOT = "newllm"
EXTRA_ROOTS = ["pytest>=8"]  # the device tests run under pytest (the image has it; carried if it did not)
# The machine's own builds are never carried; pyproject's pin (what CI tests here) does not apply to them, this
# floor does: newllm must run on the GPU image's torch (its CUDA build is the point) and on its transformers
# (5.17.0 there): carrying 5.25.0 with the hub client and kernels it needs adds 18 MB, past the 40 MB the
# folder is held to; the model=<family> tests on the device check the image's version.
MACHINES_OWN = {"torch": SpecifierSet(">=2.11"), "transformers": SpecifierSet(">=5.17")}


def image_packages(path: Path = IMAGE) -> dict[str, Version | None]:
    """{canonical name: version, or None where the docs named it without one}."""
    out: dict[str, Version | None] = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            out[canonicalize_name(name)] = Version(version) if version else None
    return out


def marker_env(python_version: str | None) -> dict[str, str]:
    env = dict(default_environment())
    if python_version:
        env.update(python_version=python_version, python_full_version=f"{python_version}.0")
    env.update(sys_platform="linux", platform_system="Linux", platform_machine="x86_64", os_name="posix")
    return env


def applies(req: Requirement, env: dict[str, str], extras: set[str]) -> bool:
    return req.marker is None or any(req.marker.evaluate({**env, "extra": e}) for e in {"", *extras})


def requirements_of(name: str, extras: set[str], env: dict[str, str]) -> list[Requirement]:
    reqs = [Requirement(r) for r in metadata.distribution(name).requires or []]
    return [r for r in reqs if applies(r, env, extras)]


def installed(name: str) -> Version | None:
    try:
        return Version(metadata.version(name))
    except metadata.PackageNotFoundError:
        return None


def roots(env: dict[str, str]) -> list[Requirement]:
    if installed(ROOT) is None:
        sys.exit(f"gpu_deps: {ROOT} is not installed in {sys.executable}: install the project first")
    return requirements_of(ROOT, set(), env) + [Requirement(r) for r in EXTRA_ROOTS]


def image_satisfies(req: Requirement, version: Version | None) -> bool:
    """An image package meets `req` if its known version does; where the docs give no version, a range is
    taken on trust (`check` verifies it there) but an exact pin (pandas==3.1.1) is not: that one is carried."""
    if version is None:
        return not any(s.operator in ("==", "===") for s in req.specifier)
    return req.specifier.contains(version, prereleases=True)


def plan(python_version: str) -> tuple[dict[str, Version], dict[str, list[Requirement]]]:
    """({name: version} to carry: the closure less what the image satisfies, at this venv's versions;
    {name: the requirements that reach it} of the image's packages where the walk stops)."""
    env, image = marker_env(python_version), image_packages()
    carry: dict[str, Version] = {}
    frontier: dict[str, list[Requirement]] = {}
    todo = roots(env)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        if name in MACHINES_OWN:
            continue
        if name in image and image_satisfies(req, image[name]):
            frontier.setdefault(name, []).append(req)
            continue
        version = installed(name)
        if version is None:
            sys.exit(f"gpu_deps: {req} (needed for Python {python_version}) is not installed here: pip install it "
                     "into this venv first, so that the folder carries a version tested with newllm")
        if not req.specifier.contains(version, prereleases=True):
            sys.exit(f"gpu_deps: {req} is needed but {name} {version} is installed here")
        if name not in carry:
            carry[name] = version
            todo += requirements_of(name, set(req.extras), env)
    return dict(sorted(carry.items())), dict(sorted(frontier.items()))


def check() -> int:
    """Every requirement of the closure against this interpreter; the number of failures."""
    env = marker_env(None)
    seen: dict[str, list[Requirement]] = {}
    todo = roots(env)
    while todo:
        req = todo.pop()
        name = canonicalize_name(req.name)
        first = name not in seen
        seen.setdefault(name, []).append(req)
        if first and installed(name) is not None:
            todo += requirements_of(name, set(req.extras), env)
    bad = 0
    for name, reqs in sorted(seen.items()):
        version = installed(name)
        specs = [MACHINES_OWN[name]] if name in MACHINES_OWN else [r.specifier for r in reqs]
        unmet = [f"{name}{s}" for s in specs if version is None or not s.contains(version, prereleases=True)]
        bad += bool(unmet)
        where = "" if version is None else Path(metadata.distribution(name)._path).parent  # type: ignore[attr-defined]
        print(f"{'FAIL' if unmet else 'ok  '} {name:28} {str(version or 'missing'):14} "
              f"{'needs ' + ', '.join(unmet) if unmet else where}")
    return bad


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("plan").add_argument("--python-version", default="3.12")
    sub.add_parser("image").add_argument("--python-version", default="3.12")
    sub.add_parser("check")
    args = p.parse_args()
    if args.cmd == "plan":
        for name, version in plan(args.python_version)[0].items():
            print(f"{name}=={version}")
    elif args.cmd == "image":  # what a stand-in for the image must hold (benchmarks/gpu_rehearsal.sh)
        image = image_packages()
        for name, reqs in plan(args.python_version)[1].items():
            known = image[name]
            spec = f"=={known}" if known else ",".join(sorted({str(s) for r in reqs for s in r.specifier}))
            print(f"{name}{spec}")
    else:
        bad = check()
        print(f"gpu_deps check: {bad} package(s) fail newllm's requirements" if bad else "gpu_deps check: all met")
        sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()
