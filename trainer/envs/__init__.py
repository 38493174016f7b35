"""The 30 MT30 evaluation environments (dm_control; needs the `envs` extra).

suite  -- MT30Env (padding, action masking and repeat, 500-step episodes) and make_env
custom -- the 11 custom tasks: rewards and initialisation written from spec F
models -- their MuJoCo models, edited from dm_control's shipped XML
"""

from trainer.envs.suite import ACTION_REPEAT, EPISODE_LENGTH, MT30Env, make_env

__all__ = ["ACTION_REPEAT", "EPISODE_LENGTH", "MT30Env", "make_env"]
