"""Tests for trainer.model.checkpoint: official file formats (docs/tdmpc2.md#checkpoints), quantized files
(docs/distillation.md#quantization)."""

import pytest
import torch
from conftest import TD_MPC_OPT, needs_td_mpc_opt

from trainer.model.checkpoint import (
    CheckpointError,
    QuantizedCheckpointError,
    detect_model_size,
    load_checkpoint,
    read_checkpoint,
    save_atomic,
    save_official,
)
from trainer.model.math import two_hot_inv
from trainer.model.presets import ModelConfig
from trainer.model.world import WorldModel
from trainer.training.agent import TDMPC2Agent, prepare_teacher

FP16 = TD_MPC_OPT / "mt30_1M_steps_045dist_fp16.pt"
INT8 = TD_MPC_OPT / "mt30_1M_steps_045dist_int8.pt"
MIXED = TD_MPC_OPT / "mt30_1M_steps_045dist_mixed.pt"
OLD_FIELDS = ("weight", "bias", "ln.weight", "ln.bias")


def to_old_api(state: dict) -> dict:
    """Our new-API state_dict in the pre-Nov-2024 layout (inverse of docs/tdmpc2.md#old-api)."""
    out = {}
    for key, value in state.items():
        if key in ("_action_masks", "log_std_min", "log_std_dif"):
            continue
        if key.startswith("_detach_Qs_params.") or key.endswith(("__batch_size", "__device")):
            continue
        for new, old in (
            ("_Qs.params.", "_Qs.params."),
            ("_target_Qs_params.", "_target_Qs.params."),
        ):
            if key.startswith(new):
                layer, field = key[len(new) :].split(".", 1)
                out[f"{old}{4 * int(layer) + OLD_FIELDS.index(field)}"] = value
                break
        else:
            out[key] = value
    return out


def trained_like_model(seed: int = 0) -> WorldModel:
    """A 1M model whose online and target Q differ and whose heads are non-zero."""
    torch.manual_seed(seed)
    model = WorldModel(ModelConfig.for_size(1))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        for t in model._target_Qs_params.tensors().values():
            t.add_(torch.randn_like(t) * 0.05)
    return model.eval()


def outputs(model: WorldModel, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    obs, action = torch.randn(8, 24, generator=g), torch.rand(8, 6, generator=g) * 2 - 1
    task = torch.randint(0, 30, (8,), generator=g)
    torch.manual_seed(seed)
    with torch.no_grad():
        z = model.encode(obs, task)
        a, _ = model.pi(z, task)
        return [
            z,
            model.next(z, action, task),
            model.reward(z, action, task),
            a,
            model.Q(z, action, task, mode="all"),
            model.Q(z, action, task, mode="all", target=True),
        ]


def assert_same_outputs(a: WorldModel, b: WorldModel) -> None:
    for x, y in zip(outputs(a), outputs(b), strict=True):
        assert torch.equal(x, y)


def test_save_official_round_trip(tmp_path):
    model = trained_like_model()
    path = tmp_path / "model.pt"
    save_official(model, path)
    raw = torch.load(path, weights_only=True)
    assert list(raw) == ["model"] and list(raw["model"]) == list(model.state_dict())
    loaded = load_checkpoint(path)
    assert loaded.cfg.model_size == 1 and not loaded.training
    assert_same_outputs(model, loaded)


def test_new_api_file_written_on_a_gpu_loads_on_cpu(tmp_path):
    model = trained_like_model()
    state = model.state_dict()
    for prefix in ("_Qs.params", "_detach_Qs_params", "_target_Qs_params"):
        state[f"{prefix}.__device"] = torch.device("cuda", 0)  # as tensordict records it there
    torch.save({"model": state}, tmp_path / "gpu.pt")
    assert_same_outputs(model, load_checkpoint(tmp_path / "gpu.pt"))


def test_old_api_file_loads_like_its_new_api_form(tmp_path):
    model = trained_like_model()
    old = to_old_api(model.state_dict())
    assert len(old) == 61
    torch.save({"model": old}, tmp_path / "old.pt")
    save_official(model, tmp_path / "new.pt")
    from_old, from_new = load_checkpoint(tmp_path / "old.pt"), load_checkpoint(tmp_path / "new.pt")
    assert_same_outputs(from_old, from_new)
    sd_old, sd_new = from_old.state_dict(), from_new.state_dict()
    for key in sd_new:
        if isinstance(sd_new[key], torch.Tensor):
            assert torch.equal(sd_old[key], sd_new[key]), key
    assert torch.equal(sd_old["_Qs.params.1.ln.weight"], old["_Qs.params.6"])
    assert torch.equal(sd_old["_target_Qs_params.2.bias"], old["_target_Qs.params.9"])


def test_float16_files_are_read_as_float32(tmp_path):
    model = trained_like_model()
    half = {
        k: v.half() if v.is_floating_point() else v
        for k, v in to_old_api(model.state_dict()).items()
    }
    torch.save({"model": half}, tmp_path / "half.pt")
    state = read_checkpoint(tmp_path / "half.pt")
    assert all(v.dtype == torch.float32 for v in state.values())
    loaded = load_checkpoint(tmp_path / "half.pt")
    assert torch.equal(loaded._pi[0].weight, half["_pi.0.weight"].float())


def test_detect_model_size_from_shapes():
    for size in (1, 5, 317):
        with torch.device("meta"):
            state = WorldModel(ModelConfig.for_size(size)).state_dict()
        assert detect_model_size(state) == size
        assert detect_model_size(to_old_api(state)) == size


def test_a_file_that_fits_no_size_is_refused_with_the_mismatches(tmp_path):
    state = trained_like_model().state_dict()
    state["_pi.0.weight"] = torch.zeros(384, 225)
    with pytest.raises(
        CheckpointError, match=r"_pi\.0\.weight: file \(384, 225\) vs model \(384, 224\)"
    ):
        detect_model_size(state)
    save_official(trained_like_model(), tmp_path / "m.pt")
    with pytest.raises(CheckpointError, match=r"does not fit a 5M model.*It fits: 1M"):
        load_checkpoint(tmp_path / "m.pt", size=5)


def test_missing_or_extra_keys_are_refused():
    state = to_old_api(trained_like_model().state_dict())
    del state["_reward.1.ln.bias"]
    with pytest.raises(CheckpointError, match=r"missing _reward\.1\.ln\.bias"):
        detect_model_size(state)
    with pytest.raises(CheckpointError, match="neither new-API"):
        detect_model_size({"_pi.0.weight": torch.zeros(1)})


def test_non_checkpoints_are_refused(tmp_path):
    torch.save({"step": 3}, tmp_path / "x.pt")
    with pytest.raises(CheckpointError, match="not a"):
        read_checkpoint(tmp_path / "x.pt")
    with pytest.raises(FileNotFoundError):
        read_checkpoint(tmp_path / "absent.pt")


def test_files_that_are_not_checkpoints_are_named_for_what_they_are(tmp_path):
    """What a user passes by mistake as a checkpoint, each told apart from a damaged file."""
    from conftest import make_source

    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(CheckpointError, match=r"notes\.txt is not a torch\.save file"):
        read_checkpoint(tmp_path / "notes.txt")
    chunk = make_source(tmp_path / "src", episodes_per_task=1, chunks=1) / "chunk_0.pt"
    with pytest.raises(CheckpointError, match=r"is an MT30 data chunk.*datapipe build --src"):
        read_checkpoint(chunk)
    good = tmp_path / "model.pt"
    save_official(WorldModel(ModelConfig.for_size(1)), good)
    (tmp_path / "cut.pt").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or truncated torch file"):
        read_checkpoint(tmp_path / "cut.pt")
    state = read_checkpoint(good)
    torch.save({"model": state}, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    legacy = read_checkpoint(tmp_path / "legacy.pt")  # the legacy container loads as well
    assert all(torch.equal(legacy[k], v) for k, v in state.items() if isinstance(v, torch.Tensor))


def quantize(state: dict, keys) -> dict:
    return {
        k: torch.quantize_per_tensor(v, 1.0, 0, torch.qint8) if k in keys else v
        for k, v in state.items()
    }


@pytest.mark.filterwarnings("ignore:torch.quantize_per_tensor")
def test_quantized_files_are_refused_unless_allowed(tmp_path):
    old = to_old_api(trained_like_model().state_dict())
    q_keys = [k for k in old if "Qs" in k]
    torch.save({"model": quantize(old, q_keys)}, tmp_path / "q.pt")
    with pytest.raises(QuantizedCheckpointError) as err:
        load_checkpoint(tmp_path / "q.pt")
    message = str(err.value)
    for part in ("20 of 61", "torch.qint8", "_Qs.params.0", "scale: 1.0", "exactly 0", "unusable"):
        assert part in message
    assert "allow_quantized=True" in message
    model = load_checkpoint(tmp_path / "q.pt", allow_quantized=True)
    assert torch.equal(model._Qs.params.get_submodule("0").weight, old["_Qs.params.0"].round())


def test_save_atomic_replaces_and_leaves_no_temp_files(tmp_path):
    path = tmp_path / "sub" / "ckpt.pt"
    save_atomic({"a": torch.ones(2)}, path)
    save_atomic({"a": torch.zeros(2)}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(2))
    with pytest.raises(Exception):  # noqa: B017 - whatever pickling raises
        save_atomic({"bad": lambda: None}, path)
    assert torch.equal(torch.load(path)["a"], torch.zeros(2))
    assert [p.name for p in path.parent.iterdir()] == ["ckpt.pt"]


@needs_td_mpc_opt
def test_fixture_fp16_loads_as_1m_model():
    raw = torch.load(FP16, map_location="cpu", weights_only=True)["model"]
    model = load_checkpoint(FP16)
    assert model.cfg.model_size == 1
    sd = model.state_dict()
    assert all(v.dtype == torch.float32 for k, v in sd.items() if k.startswith("_encoder"))
    assert torch.equal(sd["_Qs.params.1.ln.weight"], raw["_Qs.params.6"].float())
    assert torch.equal(sd["_detach_Qs_params.1.ln.weight"], raw["_Qs.params.6"].float())
    assert torch.equal(sd["_target_Qs_params.0.weight"], raw["_target_Qs.params.0"].float())
    assert all(torch.isfinite(x).all() for x in outputs(model))
    norms = model._task_emb.weight.norm(dim=-1)
    # trained rows sit near norm 1 (docs/tdmpc2.md#task-embedding)
    assert norms.max() < 1.001 and norms.min() > 0.8


@needs_td_mpc_opt
def test_fixture_fp16_as_teacher_and_as_agent_init():
    teacher = prepare_teacher(load_checkpoint(FP16), dtype=torch.bfloat16)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    obs, task = torch.randn(16, 24), torch.arange(16)
    with torch.no_grad():
        r = two_hot_inv(
            teacher.reward(
                teacher.encode(obs.bfloat16(), task), torch.zeros(16, 6).bfloat16(), task
            )
        )
    assert torch.isfinite(r.float()).all()
    agent = TDMPC2Agent.from_checkpoint(FP16)
    assert agent.cfg.model_size == 1
    assert all(torch.isfinite(x).all() for x in outputs(agent.model))


@needs_td_mpc_opt
@pytest.mark.parametrize(
    ("path", "n_quantized"), [(INT8, "61 of 61"), (MIXED, "20 of 61")], ids=["int8", "mixed"]
)
def test_fixture_quantized_files_are_refused(path, n_quantized):
    with pytest.raises(QuantizedCheckpointError) as err:
        load_checkpoint(path)
    message = str(err.value)
    assert n_quantized in message and "scale: 1.0" in message and "unusable" in message
    model = load_checkpoint(path, allow_quantized=True)
    assert model.cfg.model_size == 1
    assert all(torch.isfinite(x).all() for x in outputs(model))
