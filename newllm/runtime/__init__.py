"""The run's machinery around the science: what a run leaves on disk and how it survives a kill.

  lifecycle.py   typed loop states (Phase1State, Phase2State), resume, the phase boundary
  checkpoint.py  checkpoint files: atomic save, checked load (the only way a checkpoint is read)
  rundirs.py     run folders: claimed atomically, never shared, resume= validated
  memory.py      will the model fit; out-of-memory as one line naming the keys that size it
  tracking.py    metrics.json, history.csv, curves, and the optional trackers (TensorBoard, MLflow)
  fileio.py      atomic writes (temp file + rename) of every artifact
"""
