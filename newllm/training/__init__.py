"""Training and evaluation: Phase 1 (CVFP), Phase 2 (next-token prediction), and what measures them.

  phase1.py      CVFP: pass 0, Jacobi sweeps, held-out convergence, the early stop
  solvers.py     pass-0 inits and the Phase-2 window solvers
  diversity.py   the diversity regularisers L_div
  phase2.py      next-token training with plateau stopping, validation and test
  repetition.py  staged phrase-repetition training
  instruments.py loss by position in the window
  evaluation.py  the one evaluation loop (Phase-2 validation and test, recall accuracy by distance)
  accel.py       precision (autocast) and torch.compile switches
"""
