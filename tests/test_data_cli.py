"""Data options through the real CLI: plain text, repetition, bad input."""

from __future__ import annotations

import re

import pytest

from tests.conftest import REPO, TINY, read_metrics
from tests.test_data import write_wiki


@pytest.mark.slow
def test_text_run_end_to_end(tiny_run, tmp_path):
    wiki = write_wiki(tmp_path / "wiki.txt", 30)
    run_dir, _ = tiny_run("text", "data=text", f"data.files=[{wiki}]", "training.phase1.max_iterations=2",
                          "training.phase1.max_tokens=256", "training.phase2.max_steps_per_epoch=5",
                          "save_checkpoint=false", "save_contexts=false")
    m = read_metrics(run_dir)
    assert m["data/name"] == "text" and m["data/val_protocol"] == "by_conversation"
    assert (m["data/documents"], m["data/val_documents"]) == (33, 3)  # 30 paragraphs + 3 headings
    assert m["data/train_loss_tokens"] == m["data/train_tokens"] > 2000
    assert m["phase2/val_ppl"] < m["phase2/uniform_ppl"] and m["data/tokens_cache_hit"] is False


def test_repetition_runs_phase1_and_phase2(tmp_path):
    """In-process (the same `run` the CLI calls) to spare a second interpreter start-up."""
    from hydra import compose, initialize_config_dir

    from newllm.run import run

    overrides = [o for o in TINY if not o.startswith("data.num_conversations")]
    with initialize_config_dir(config_dir=str(REPO / "conf")):
        cfg = compose("config", [*overrides, "data=repetition", f"paths.output_root={tmp_path}",
                                 "training.phase1.max_iterations=2", "training.phase1.max_tokens=256",
                                 "training.phase2.max_steps_per_epoch=3",
                                 "save_checkpoint=false", "save_contexts=false"])
    m, _ = run(cfg, tmp_path / "rep")
    assert m["data/name"] == "repetition" and m["data/phrase_lengths"] == "1,2,3"
    assert (m["data/train_tokens"], m["data/val_tokens"]) == (16 * 20 * 6, 4 * 20 * 6)
    assert 0.0 <= m["phase1/val_convergence_rate"] <= 1.0 and m["phase1/iterations"] == 2
    assert m["phase2/val_ppl"] > 0 and m["phase2/val_tokens"] > 0


@pytest.mark.slow
def test_bad_data_input_is_one_error_line_and_exit_2(tiny_run, tmp_path):
    _, proc = tiny_run("bad", "data=text", "data.files=[nowhere/missing.txt]", check=False)
    assert proc.returncode == 2
    assert [line for line in proc.stderr.splitlines() if line.startswith("error:")] == [
        "error: data.files='nowhere/missing.txt' does not exist (or is not a file)"]
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "cache" / "prepared").exists()


def test_data_values_are_checked_at_compose_time():
    from hydra import compose, initialize_config_dir
    from hydra.errors import ConfigCompositionException

    import newllm.run  # noqa: F401 -- registers the structured configs
    from newllm.config import validate
    from newllm.errors import ConfigError

    cases = {"data.repetitions=1": "data.repetitions=1 is not allowed: expected an integer >= 2",
             "data.phrase_lengths=[2,0]": "data.phrase_lengths=[2, 0] is not allowed"}
    with initialize_config_dir(config_dir=str(REPO / "conf")):
        with pytest.raises(ConfigCompositionException) as e:  # a choice field (an Enum): refused while composing
            compose("config", ["data=text", "data.split_by=chapter"])
        assert "Invalid value 'chapter', expected one of [auto, paragraph, line, file]" in str(e.value.__cause__)
        for override, expected in cases.items():
            with pytest.raises(ConfigError, match=re.escape(expected)):
                validate(compose("config", ["data=repetition", override]))
