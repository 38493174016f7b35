"""Evaluating a world model in the 30 MT30 environments: `trainer eval`.

envs     -- the MT30 environments (dm_control; the `envs` extra), the 11 custom tasks
plan     -- MPPI planning and policy-only action selection (Actor)
evaluate -- per-episode evaluation, its workers, outputs and normalized score

Imports trainer.model and datapipe only.
"""
