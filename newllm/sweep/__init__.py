"""The trial side of a sweep, and what the sweeper shares with it.

  hooks.py    inside a job: attach to its Optuna trial, report intermediate values, prune, early-stop rules
  storage.py  storage URLs as recorded (passwords masked), folder names, opening a study when workers race
  compat.py   the private Optuna / Hydra APIs relied on, behind a version check

The sweeper itself is hydra_plugins/newllm_sweeper (Hydra loads plugins only from that namespace).
"""
