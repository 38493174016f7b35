"""Known multi-task sets: task names and per-task observation/action dims.

This is the only place that names tasks. `datapipe build` picks the set that matches the
source (or the one given with `--task-set`) and writes names and dims into the store's
metadata; everything downstream reads them from there.
"""

from __future__ import annotations

from dataclasses import dataclass

_DMC_NAMES = (
    "walker-stand walker-walk walker-run cheetah-run reacher-easy reacher-hard acrobot-swingup "
    "pendulum-swingup cartpole-balance cartpole-balance-sparse cartpole-swingup "
    "cartpole-swingup-sparse cup-catch finger-spin finger-turn-easy finger-turn-hard fish-swim "
    "hopper-stand hopper-hop walker-walk-backwards walker-run-backwards cheetah-run-backwards "
    "cheetah-run-front cheetah-run-back cheetah-jump hopper-hop-backwards reacher-three-easy "
    "reacher-three-hard cup-spin pendulum-spin"
).split()
_DMC_OBS = [24, 24, 24, 17, 6, 6, 6, 3, 5, 5, 5, 5, 8, 9, 12, 12, 24, 15, 15, 24, 24, 17, 17, 17,
            17, 15, 8, 8, 8, 3]  # fmt: skip
_DMC_ACT = [6, 6, 6, 6, 2, 2, 1, 1, 1, 1, 1, 1, 2, 2, 2, 2, 5, 4, 4, 6, 6, 6, 6, 6, 6, 4, 3, 3,
            2, 1]  # fmt: skip

_METAWORLD_NAMES = [
    "mw-" + name
    for name in (
        "assembly basketball button-press-topdown button-press-topdown-wall button-press "
        "button-press-wall coffee-button coffee-pull coffee-push dial-turn disassemble door-open "
        "door-close drawer-close drawer-open faucet-open faucet-close hammer handle-press-side "
        "handle-press handle-pull-side handle-pull lever-pull peg-insert-side peg-unplug-side "
        "pick-out-of-hole pick-place pick-place-wall plate-slide plate-slide-side "
        "plate-slide-back plate-slide-back-side push-back push push-wall reach reach-wall "
        "shelf-place soccer stick-push stick-pull sweep-into sweep window-open window-close "
        "bin-picking box-close door-lock door-unlock hand-insert"
    ).split()
]


@dataclass(frozen=True)
class TaskSet:
    """A named list of tasks with the unpadded dims of each (index = task id), and the rows
    of each of its released episodes (row 0: the reset observation, then one per step);
    `release_chunks`: the episodes in each file of the released dataset, where known."""

    name: str
    names: tuple[str, ...]
    obs_dims: tuple[int, ...]
    action_dims: tuple[int, ...]
    rows: int
    release_chunks: tuple[int, ...] = ()

    @property
    def n_tasks(self) -> int:
        return len(self.names)

    @property
    def obs_dim(self) -> int:
        """Padded observation width: the widest task."""
        return max(self.obs_dims)

    @property
    def action_dim(self) -> int:
        """Padded action width: the widest task."""
        return max(self.action_dims)


MT30 = TaskSet(
    "mt30", tuple(_DMC_NAMES), tuple(_DMC_OBS), tuple(_DMC_ACT), rows=501,
    release_chunks=(200_000, 200_000, 200_000, 90_000),
)  # fmt: skip
MT80 = TaskSet(
    "mt80",
    tuple(_DMC_NAMES + _METAWORLD_NAMES),
    tuple(_DMC_OBS + [39] * len(_METAWORLD_NAMES)),
    tuple(_DMC_ACT + [4] * len(_METAWORLD_NAMES)),
    rows=101,
)
TASK_SETS = {ts.name: ts for ts in (MT30, MT80)}


def get_task_set(name: str) -> TaskSet:
    """The task set called `name`; the error lists the known ones."""
    try:
        return TASK_SETS[name]
    except KeyError:
        raise ValueError(f"unknown task set {name!r}; known: {', '.join(TASK_SETS)}") from None


def match_task_set(obs_dim: int, action_dim: int) -> TaskSet | None:
    """The known task set whose padded dims are (obs_dim, action_dim), if exactly one is."""
    found = [
        ts for ts in TASK_SETS.values() if (ts.obs_dim, ts.action_dim) == (obs_dim, action_dim)
    ]
    return found[0] if len(found) == 1 else None
