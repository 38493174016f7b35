"""The 30 MT30 evaluation environments (dm_control; needs the `envs` extra).

suite    -- MT30Env (padding, action masking and repeat, 500-step episodes) and make_env
custom   -- the 11 custom tasks: rewards and initialisation (docs/tdmpc2.md#custom-tasks)
models   -- their MuJoCo models, edited from dm_control's shipped XML
headless -- no GLFW/X11 or MuJoCo deprecation lines on a machine without a display

Importing this package names dm_control's headless OpenGL backend (`MUJOCO_GL`, unless the
user set it or there is a display) before dm_control is imported: dm_control reads it once,
at import, and would otherwise try GLFW first and print an X11 error (see headless.py).
"""

from trainer.evaluation.envs.headless import choose_gl_backend

choose_gl_backend()

from trainer.evaluation.envs.suite import ACTION_REPEAT, EPISODE_LENGTH, MT30Env, make_env  # noqa: E402

__all__ = ["ACTION_REPEAT", "EPISODE_LENGTH", "MT30Env", "make_env"]
