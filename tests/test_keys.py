"""newllm/keys.py is the contract for every key a run writes: the code, the presets and the docs name only
keys it defines, and real runs write nothing else (issue 29)."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest
import yaml

from newllm import keys

REPO = Path(__file__).resolve().parents[1]
GROUPS = ("phase1", "phase2", "data", "model", "recall", "repetition", "time")
# a key in backticks; a family is written with a wildcard (phase1/test_*, repetition/p{p}/..., phase2/*_loss)
MENTION = re.compile(rf"`((?:{'|'.join(GROUPS)})/[A-Za-z0-9_/{{}}<>.*-]*)`")
WILDCARD = re.compile(r"\*|\.\.\.|\{[^}]*\}|<[^>]*>")


def test_is_known_accepts_every_family_member_and_refuses_near_misses():
    for split in keys.HELD_OUT:
        for measure in keys.P1_HELD_OUT_MEASURES:
            assert keys.is_known(keys.p1_held_out(split, measure))
        for measure in keys.P2_EVAL_MEASURES:
            assert keys.is_known(keys.p2_split(split, measure))
        for measure in keys.RECALL_MEASURES:
            assert keys.is_known(keys.recall_split(split, measure))
    assert keys.is_known(keys.rep_stage(3, "cycle_distance", "end")) and keys.is_known(keys.rep_stage(2))
    assert keys.is_known(keys.P2_TEST_PPL) and keys.is_known(keys.MODEL_PARAMS_CORE)
    for typo in ("phase2/val_pplx", "phase1/val_convergence", "phase1/train_convergence_rate", "phase3/loss",
                 "recall/train_accuracy", "model/parms", "data/dev_tokens", "phase2/val_ppl "):
        assert not keys.is_known(typo), typo


def _objectives() -> list[tuple[str, str]]:
    found = []
    for path in [REPO / "conf" / "config.yaml", *sorted((REPO / "sweeps").rglob("*.yaml"))]:
        doc = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        found += [(path.name, o) for o in doc.get("objectives") or []]
    return found


def test_every_objective_a_preset_names_is_a_defined_key():
    found = _objectives()
    assert found, "no preset names objectives: the walk is broken"
    assert [(f, o) for f, o in found if not keys.is_known(o)] == []


def _doc_mentions() -> list[tuple[str, str]]:
    docs = [REPO / "README.md", REPO / "benchmarks" / "README.md", *sorted((REPO / "docs").glob("*.md"))]
    return [(p.name, m) for p in docs if p.exists() for m in MENTION.findall(p.read_text(encoding="utf-8"))
            if not m.endswith("/")]  # model/updater/ is a config group, not a key


def test_readme_and_docs_name_only_defined_keys():
    """An exact key must be defined; a family (written with a wildcard) must be one of keys' groups."""
    mentions = _doc_mentions()
    assert len(mentions) > 20, "the docs name metrics in backticks: the scan is broken"
    unknown = [(f, m) for f, m in mentions if not WILDCARD.search(m) and not keys.is_known(m)]
    assert unknown == []


@pytest.mark.slow
def test_real_runs_write_only_defined_keys(analysis_outputs, compare_outputs, tiny_run):
    """Every metrics.json and history.csv column of real runs: a grid, Optuna studies, the model comparison
    (sequential, layer-wise, GRU, transformer), repetition and recall runs."""
    rep, _ = tiny_run("repetition", "data=repetition", "training=repetition", "training.repetition.steps_per_stage=2")
    rec, _ = tiny_run("recall", "data=recall", "data.num_train=64", "data.num_val=16", "data.num_test=16")
    roots = [analysis_outputs["outputs"], compare_outputs, rep, rec]
    written: set[str] = set()
    for root in roots:
        for m in Path(root).rglob("metrics.json"):
            written |= set(json.loads(m.read_text()))
        for h in Path(root).rglob("history.csv"):
            with h.open() as f:
                written |= set(next(csv.reader(f)))
    history_columns = {"phase", "step", "epoch", "evaluation"}
    assert len(written) > 100
    assert {k for k in written - history_columns - {"objectives"} if not keys.is_known(k)} == set()
