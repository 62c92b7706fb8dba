"""newllm's Optuna sweeper (`hydra/sweeper=newllm_optuna`) and the `+sweep=<name>` presets."""
