"""Training machinery shared by every method: the one run loop (:mod:`.run_loop`).

Every method (IDEAL, NaiveKD, DFME, BiDf-MKD and the baselines) is a
:class:`~dfml_jax.training.run_loop.Method` run by :func:`~dfml_jax.training.run_loop.run`,
which owns budgets and the query ledger, checkpoint/resume, evaluation points, the progress bar,
the curve and ``result.json``. The methods are listed in :data:`dfml_jax.methods.METHODS`.
"""
from dfml_jax.training.run_loop import (LOG, STEP_COUNT, STEP_INDEX, STOP, CheckpointLayout,
                                        EvalAt, Method, RunOutcome, atomic_write_json, run,
                                        step_key)

__all__ = ["Method", "EvalAt", "RunOutcome", "CheckpointLayout", "STEP_INDEX", "STEP_COUNT",
           "STOP", "LOG", "run", "step_key", "atomic_write_json"]
