"""run.compile: each mode builds and runs a tiny training step, on the modules it names; old
true/false configs still read; the --compile flags of train.py, predict.py and bench.py."""

from __future__ import annotations

import pytest
import torch

import bench
import predict
import train
from config import COMPILE_MODES, config_from_dict, config_to_dict, make_config
from modules import REPEATED_BLOCKS, Conditions, NoiseScheduler, compile_model
from pipeline import build_unet
from utils import Runtime


@pytest.fixture
def eager_compile(monkeypatch) -> list[str | None]:
    """torch.compile with dynamo's eager backend: real graph capture without a C++ compiler, fast
    enough for the suite; records the mode each call asked for."""
    real_compile, modes = torch.compile, []

    def recorded(model, *args, mode=None, **kwargs):
        modes.append(mode)
        return real_compile(model, backend="eager")

    monkeypatch.setattr(torch, "compile", recorded)
    return modes


@pytest.mark.parametrize("mode", COMPILE_MODES)
def test_each_mode_compiles_what_it_names_and_trains_a_step(mode: str, eager_compile: list) -> None:
    config = make_config("tiny")
    config.run.compile = mode
    torch.manual_seed(0)
    unet = build_unet(config)
    trained = train.prepare_for_training(unet, config, Runtime(torch.device("cpu")))
    blocks = [module for module in unet.modules() if isinstance(module, REPEATED_BLOCKS)]
    compiled_blocks = [module for module in blocks if module._compiled_call_impl is not None]
    if mode == "none":
        assert trained is unet and not eager_compile and not compiled_blocks
    elif mode == "regional":
        assert trained is unet and compiled_blocks == blocks and eager_compile == [None] * len(blocks)
    else:
        assert trained._orig_mod is unet and not compiled_blocks
        assert eager_compile == ["reduce-overhead" if mode == "reduce-overhead" else None]
    loss = NoiseScheduler(config.scheduler).training_loss(trained, torch.randn(2, 4, 8, 8), Conditions(torch.tensor([0, 1])))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in unet.parameters())
    assert unet.state_dict().keys() == build_unet(config).state_dict().keys(), "checkpoints must load uncompiled"


def test_unknown_mode_is_refused() -> None:
    with pytest.raises(ValueError, match="choose none, full, regional or reduce-overhead"):
        compile_model(torch.nn.Linear(1, 1), "max")


def test_configs_from_before_the_modes_read_true_and_false() -> None:
    for old, new in ((False, "none"), (True, "full")):
        data = config_to_dict(make_config("tiny"))
        data["run"]["compile"] = old
        assert config_from_dict(data).run.compile == new


@pytest.mark.parametrize(
    "argv, expected",
    [
        ([], None),
        (["--compile"], "full"),
        (["--compile", "regional"], "regional"),
        (["--run.compile", "reduce-overhead"], "reduce-overhead"),
    ],
)
def test_train_compile_flag(argv: list[str], expected: str | None) -> None:
    _, overrides = train.parse_args(["--preset", "tiny", *argv])
    assert overrides.get("run.compile") == expected


def test_bad_compile_modes_exit_2_in_one_line(tmp_path, capsys) -> None:
    for main, argv in (
        (train.main, ["--preset", "tiny", "--run", str(tmp_path / "run"), "--run.compile", "max"]),
        (train.main, ["--preset", "tiny", "--run", str(tmp_path / "run"), "--compile", "max"]),
        (predict.main, ["--label", "AD", "--compile", "max"]),
        (bench.main, ["--preset", "tiny", "--compile", "max"]),
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        error = capsys.readouterr().err.strip()
        assert len(error.splitlines()) == 1 and "max" in error
    assert not (tmp_path / "run").exists()
