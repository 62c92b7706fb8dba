"""newllm: a Hydra-configured research harness for context-vector language models."""

__version__ = "0.1.0"
