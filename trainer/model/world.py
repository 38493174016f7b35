"""The TD-MPC2 world model (docs/tdmpc2.md#model): networks, their forward passes and the
parameter layout.

Losses, optimisers and the update live in `trainer.training.agent`. The module tree reproduces the
official new-API state_dict (docs/tdmpc2.md#new-api) key for key: the Q ensemble's stacked
parameters sit under `_Qs.params`, a no-grad view of them under `_detach_Qs_params` and the
Polyak target under `_target_Qs_params`, each followed by `__batch_size` and `__device`
entries.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from trainer.model.math import two_hot_inv
from trainer.model.presets import ModelConfig

# ln(sqrt(2 pi)), subtracted per action dim in the Gaussian log-density (docs/tdmpc2.md#policy).
_LOG_SQRT_2PI = 0.9189385175704956
_BATCH_SIZE_KEY = "__batch_size"
_DEVICE_KEY = "__device"


class SimNorm(nn.Module):
    """Softmax over consecutive groups of `dim` entries of the last axis."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: Tensor) -> Tensor:
        shape = x.shape
        x = x.view(*shape[:-1], -1, self.dim)
        return F.softmax(x, dim=-1).view(*shape)


class NormedLinear(nn.Linear):
    """Linear -> Dropout (if p > 0) -> LayerNorm -> activation (Mish by default)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        dropout: float = 0.0,
        act: nn.Module | None = None,
    ) -> None:
        super().__init__(in_features, out_features)
        self.ln = nn.LayerNorm(out_features)
        self.act = nn.Mish() if act is None else act
        self.dropout = nn.Dropout(dropout) if dropout else None

    def forward(self, x: Tensor) -> Tensor:
        x = super().forward(x)
        if self.dropout is not None:
            x = self.dropout(x)
        return self.act(self.ln(x))


def mlp(
    in_dim: int, hidden: list[int], out_dim: int, act: nn.Module | None = None, dropout: float = 0.0
) -> nn.Sequential:
    """NormedLinear per hidden size (dropout on the first only), then the output layer.

    The output layer is NormedLinear(..., act) when `act` is given, else a plain Linear.
    """
    dims = [in_dim, *hidden, out_dim]
    layers: list[nn.Module] = [
        NormedLinear(dims[i], dims[i + 1], dropout=dropout * (i == 0)) for i in range(len(dims) - 2)
    ]
    layers.append(
        NormedLinear(dims[-2], dims[-1], act=act) if act else nn.Linear(dims[-2], dims[-1])
    )
    return nn.Sequential(*layers)


def weight_init(module: nn.Module) -> None:
    """docs/tdmpc2.md#init: Linear weights trunc_normal(0, 0.02), biases 0; Embedding
    U(-0.02, 0.02)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.constant_(module.bias, 0)
    elif isinstance(module, nn.Embedding):
        nn.init.uniform_(module.weight, -0.02, 0.02)


def _q_member(in_dim: int, hidden: list[int], cfg: ModelConfig) -> nn.Sequential:
    """One Q member, built and given the init of docs/tdmpc2.md#init at once (official order).

    Building draws PyTorch's default Linear init and `weight_init` then draws the
    trunc_normal weights; doing both per member, rather than building all members first,
    is what makes the same seed give the official Q weights.
    """
    member = mlp(in_dim, hidden, cfg.num_bins, dropout=cfg.dropout)
    member.apply(weight_init)
    return member


def _device_entry(tensor: Tensor) -> torch.device | None:
    """The `__device` value tensordict writes: None for CPU tensors, else their device."""
    return None if tensor.device.type == "cpu" else tensor.device


def stack_members(members: list[nn.Module]) -> dict[str, Tensor]:
    """Name -> parameters of all members stacked on a new leading axis."""
    per_member = [dict(m.named_parameters()) for m in members]
    return {name: torch.stack([p[name].detach() for p in per_member]) for name in per_member[0]}


class StackedParams(nn.Module):
    """Parameters of Nq modules stacked on a leading axis, laid out like tensordict's params.

    Children mirror the member's module tree, so names ("0.weight", "0.ln.bias", ...) match
    the member for `torch.func.functional_call`. `learnable=False` stores buffers instead of
    parameters (the target ensemble). The state_dict ends with `__batch_size` (Size([Nq]))
    and `__device` entries, as the official TensorDictParams writes them.
    """

    def __init__(self, tensors: dict[str, Tensor], learnable: bool) -> None:
        super().__init__()
        self.num = next(iter(tensors.values())).shape[0]
        for name, tensor in tensors.items():
            *path, leaf = name.split(".")
            owner: nn.Module = self
            for part in path:
                if part not in owner._modules:
                    owner.add_module(part, nn.Module())
                owner = owner._modules[part]
            if learnable:
                owner.register_parameter(leaf, nn.Parameter(tensor.detach().clone()))
            else:
                owner.register_buffer(leaf, tensor.detach().clone())
        self.register_state_dict_post_hook(_append_tensordict_entries)

    def tensors(self) -> dict[str, Tensor]:
        """Name -> stacked tensor, in state_dict order."""
        return dict(self.named_parameters()) | dict(self.named_buffers())

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
        )
        _check_tensordict_entries(self.num, state_dict, prefix, missing_keys, errors)
        for key in (prefix + _BATCH_SIZE_KEY, prefix + _DEVICE_KEY):
            if key in unexpected_keys:
                unexpected_keys.remove(key)


class DetachedParams(nn.Module):
    """A no-grad view of another StackedParams, sharing its storage (`_detach_Qs_params`).

    It owns no tensors: its state_dict entries are the source's tensors, detached, and
    loading copies into the source (so, as in the official code, these values are written
    after `_Qs.params` and win if the two differ).
    """

    def __init__(self, source: StackedParams) -> None:
        super().__init__()
        self.__dict__["_source"] = source  # not registered: the source is saved by its owner
        self.num = source.num
        self.register_state_dict_post_hook(self._save_view)

    def tensors(self) -> dict[str, Tensor]:
        """Name -> detached stacked tensor of the source."""
        return {name: t.detach() for name, t in self._source.tensors().items()}

    @staticmethod
    def _save_view(module: DetachedParams, state_dict, prefix, local_metadata) -> None:
        for name, tensor in module.tensors().items():
            state_dict[prefix + name] = tensor
        _append_tensordict_entries(module._source, state_dict, prefix, local_metadata)

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, errors
    ) -> None:
        expected = set()
        for name, tensor in self._source.tensors().items():
            key = prefix + name
            expected.add(key)
            if key not in state_dict:
                missing_keys.append(key)
            elif state_dict[key].shape != tensor.shape:
                errors.append(
                    f"size mismatch for {key}: copying a param with shape "
                    f"{tuple(state_dict[key].shape)}, the model has {tuple(tensor.shape)}"
                )
            else:
                with torch.no_grad():
                    tensor.copy_(state_dict[key])
        _check_tensordict_entries(self.num, state_dict, prefix, missing_keys, errors)
        expected |= {prefix + _BATCH_SIZE_KEY, prefix + _DEVICE_KEY}
        if strict:
            unexpected_keys.extend(
                k for k in state_dict if k.startswith(prefix) and k not in expected
            )


def _append_tensordict_entries(module: StackedParams, state_dict, prefix, local_metadata) -> None:
    first = next(iter(module.tensors().values()))
    state_dict[prefix + _BATCH_SIZE_KEY] = torch.Size([module.num])
    state_dict[prefix + _DEVICE_KEY] = _device_entry(first)


def _check_tensordict_entries(num: int, state_dict, prefix, missing_keys, errors) -> None:
    key = prefix + _BATCH_SIZE_KEY
    if key not in state_dict:
        missing_keys.append(key)
    elif tuple(state_dict[key]) != (num,):
        errors.append(f"{key} is {state_dict[key]}, the model's ensemble has {num} members")
    if prefix + _DEVICE_KEY not in state_dict:
        missing_keys.append(prefix + _DEVICE_KEY)


class QEnsemble(nn.Module):
    """Nq copies of one mlp, evaluated with vmap over stacked parameters
    (docs/tdmpc2.md#q-ensemble).

    `params` holds the online (learnable) weights. `forward` takes whichever parameter set
    the caller passes (online, detached or target), so the three share one code path.
    """

    def __init__(self, members: list[nn.Module]) -> None:
        super().__init__()
        self.params = StackedParams(stack_members(members), learnable=True)
        # Structure only: weights are swapped in by functional_call. Kept out of the module
        # tree so it adds nothing to parameters() or the state_dict.
        self.__dict__["_template"] = copy.deepcopy(members[0]).to("meta")

    def __len__(self) -> int:
        return self.params.num

    def forward(self, x: Tensor, params: dict[str, Tensor], dropout: bool) -> Tensor:
        """Logits of every member, [Nq, ..., out]; dropout active iff `dropout`."""
        template = self._template.train(dropout)

        def member(p: dict[str, Tensor], inp: Tensor) -> Tensor:
            return torch.func.functional_call(template, p, (inp,))

        return torch.vmap(member, in_dims=(0, None), randomness="different")(params, x)


class WorldModel(nn.Module):
    """Multi-task TD-MPC2 world model for state observations (docs/tdmpc2.md#model)."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        L, E, A = cfg.latent_dim, cfg.task_dim, cfg.action_dim
        hidden = [cfg.mlp_dim, cfg.mlp_dim]
        # Construction and init order match the official code, so a seed gives the official
        # initial weights bit for bit (tests/test_model.py holds their digests).
        self._task_emb = nn.Embedding(cfg.n_tasks, E, max_norm=1)
        masks = torch.zeros(cfg.n_tasks, A)
        for i, dims in enumerate(cfg.action_dims):
            masks[i, :dims] = 1.0
        self.register_buffer("_action_masks", masks)
        enc_hidden = max(cfg.num_enc_layers - 1, 1) * [cfg.enc_dim]
        self._encoder = nn.ModuleDict(
            {"state": mlp(cfg.obs_dim + E, enc_hidden, L, act=SimNorm(cfg.simnorm_dim))}
        )
        self._dynamics = mlp(L + E + A, hidden, L, act=SimNorm(cfg.simnorm_dim))
        self._reward = mlp(L + E + A, hidden, cfg.num_bins)
        self._pi = mlp(L + E, hidden, 2 * A)
        self._Qs = QEnsemble([_q_member(L + E + A, hidden, cfg) for _ in range(cfg.num_q)])
        self.apply(weight_init)  # the stacked Q params are not Linear modules: untouched
        with torch.no_grad():
            self._reward[-1].weight.zero_()
            self._Qs.params.get_submodule(str(len(hidden))).weight.zero_()
        self.register_buffer("log_std_min", torch.tensor(cfg.log_std_min))
        self.register_buffer("log_std_dif", torch.tensor(cfg.log_std_max) - self.log_std_min)
        self._detach_Qs_params = DetachedParams(self._Qs.params)
        self._target_Qs_params = StackedParams(self._Qs.params.tensors(), learnable=False)

    # -- forward passes (docs/tdmpc2.md#networks, #policy) -------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        """The floating dtype the networks compute in (float32, or a cast model's)."""
        return self._encoder["state"][0].weight.dtype

    @property
    def device(self) -> torch.device:
        return self._action_masks.device

    def task_emb(self, x: Tensor, task: Tensor | int) -> Tensor:
        """Concatenate the embedding of `task` ([B] or one int) to the last axis of x
        ([B, D] or [T, B, D]); the embedding is repeated along T."""
        if isinstance(task, int):
            task = torch.tensor([task], device=x.device)
        emb = self._task_emb(task.long())
        if x.ndim == 3:
            emb = emb.unsqueeze(0).repeat(x.shape[0], 1, 1)
        elif emb.shape[0] == 1:
            emb = emb.repeat(x.shape[0], 1)
        return torch.cat([x, emb], dim=-1)

    def encode(self, obs: Tensor, task: Tensor | int) -> Tensor:
        """z = enc([obs, emb])."""
        return self._encoder["state"](self.task_emb(obs, task))

    def next(self, z: Tensor, a: Tensor, task: Tensor | int) -> Tensor:
        """z' = dyn([z, emb, a])."""
        return self._dynamics(torch.cat([self.task_emb(z, task), a], dim=-1))

    def reward(self, z: Tensor, a: Tensor, task: Tensor | int) -> Tensor:
        """Reward logits [..., num_bins]."""
        return self._reward(torch.cat([self.task_emb(z, task), a], dim=-1))

    def pi(self, z: Tensor, task: Tensor | int) -> tuple[Tensor, dict[str, Tensor]]:
        """One reparameterised, tanh-squashed policy sample and its info dict
        (docs/tdmpc2.md#policy)."""
        mean, raw_log_std = self._pi(self.task_emb(z, task)).chunk(2, dim=-1)
        log_std = self.log_std_min + 0.5 * self.log_std_dif * (torch.tanh(raw_log_std) + 1)
        eps = torch.randn_like(mean)
        mask = self._action_masks[task]
        mean, log_std, eps = mean * mask, log_std * mask, eps * mask
        n_active = mask.sum(-1, keepdim=True)
        gauss_log_prob = (-0.5 * eps.pow(2) - log_std - _LOG_SQRT_2PI).sum(-1, keepdim=True)
        action = mean + eps * log_std.exp()
        mean, action = torch.tanh(mean), torch.tanh(action)
        tanh_correction = torch.log(F.relu(1 - action.pow(2)) + 1e-6).sum(-1, keepdim=True)
        log_prob = gauss_log_prob - tanh_correction
        entropy_scale = gauss_log_prob * n_active / (log_prob + 1e-8)
        info = {
            "mean": mean,
            "log_std": log_std,
            "entropy": -log_prob,
            "scaled_entropy": -log_prob * entropy_scale,
        }
        return action, info

    def Q(
        self,
        z: Tensor,
        a: Tensor,
        task: Tensor | int,
        mode: str = "min",
        target: bool = False,
        detach: bool = False,
    ) -> Tensor:
        """Q ensemble. mode "all": logits [Nq, ..., K]; "min"/"avg": scalar [..., 1] over two
        members drawn by randperm. `target` uses the Polyak copy (never dropout), `detach`
        the online weights without gradient."""
        if mode not in ("all", "min", "avg"):
            raise ValueError(f"Q mode must be 'all', 'min' or 'avg', got {mode!r}")
        x = torch.cat([self.task_emb(z, task), a], dim=-1)
        if target:
            out = self._Qs(x, self._target_Qs_params.tensors(), dropout=False)
        elif detach:
            out = self._Qs(x, self._detach_Qs_params.tensors(), dropout=self.training)
        else:
            out = self._Qs(x, self._Qs.params.tensors(), dropout=self.training)
        if mode == "all":
            return out
        idx = torch.randperm(len(self._Qs), device=out.device)[[0, 1]]  # not [:2]: note below
        values = two_hot_inv(out[idx], self.cfg.vmin, self.cfg.vmax)
        if mode == "min":
            return values.min(0).values
        return values.sum(0) / 2

    @torch.no_grad()
    def soft_update_target_Q(self, tau: float) -> None:
        """target <- target + tau * (online - target), per tensor."""
        online = self._Qs.params.tensors()
        for name, target in self._target_Qs_params.tensors().items():
            target.lerp_(online[name].detach(), tau)

    def extra_repr(self) -> str:
        return f"model_size={self.cfg.model_size}, num_q={self.cfg.num_q}"


def count_parameters(module: nn.Module) -> int:
    """Number of learnable values (the target Q, a buffer set, is not counted)."""
    return sum(p.numel() for p in module.parameters())


def parameter_counts(model: WorldModel) -> dict[str, Any]:
    """Per-module learnable parameter counts, as in docs/tdmpc2.md#parameter-counts."""
    parts = {
        "task_emb": model._task_emb,
        "encoder": model._encoder,
        "dynamics": model._dynamics,
        "reward": model._reward,
        "pi": model._pi,
        "Q": model._Qs,
    }
    out: dict[str, Any] = {name: count_parameters(m) for name, m in parts.items()}
    out["total"] = count_parameters(model)
    out["target_Q"] = sum(t.numel() for t in model._target_Qs_params.tensors().values())
    return out
