"""train.py: both stages end to end on a tiny config, resume, refusals, NaN guard, torchrun."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

import train
import utils
from config import StageConfig, make_config, read_config
from conftest import TINY, run_train
from modules import AutoencoderKL, Conditions, NoiseScheduler, UNet, vae_loss
from utils import Runtime, load_checkpoint

REPO = Path(__file__).resolve().parents[1]


def test_end_to_end_writes_every_promised_file(trained_run: Path) -> None:
    for name in (
        "config.json",
        "splits.json",
        "vae.pt",
        "unet.pt",
        "history.jsonl",
        "vae_loss.png",
        "diffusion_loss.png",
        "vae_reconstructions.png",
        "samples/epoch001_AD.png",
        "samples/epoch002_NC.png",
    ):
        assert (trained_run / name).is_file(), name
    assert not list(trained_run.rglob("*.tmp")), "a temporary file was left behind"
    history = [json.loads(line) for line in (trained_run / "history.jsonl").read_text().splitlines()]
    assert [(h["stage"], h["epoch"]) for h in history] == [("vae", 1), ("vae", 2), ("unet", 1), ("unet", 2)]
    assert all(h["images_per_second"] > 0 and math.isfinite(h["train_loss"]) for h in history)
    config = read_config(trained_run)
    assert config.data.image_size == 32 and config.vae.channels == (8, 16, 16)
    unet = load_checkpoint(trained_run / "unet.pt")
    assert {"model", "ema", "optimizer", "lr_schedule", "epoch", "step", "config", "slice_range"} <= unet.keys()
    vae = load_checkpoint(trained_run / "vae.pt")
    assert float(vae["model"]["scale_factor"]) != 1.0, "latent scale factor was not set after stage 1"
    splits = json.loads((trained_run / "splits.json").read_text())
    assert not set(splits["train"]) & set(splits["val"])


def test_existing_run_is_not_overwritten(trained_run: Path, tiny_dataset: Path, capsys) -> None:
    before = (trained_run / "vae.pt").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, trained_run)
    assert exit_info.value.code == 2
    assert "--resume" in capsys.readouterr().err
    assert (trained_run / "vae.pt").read_bytes() == before


def test_model_override_on_existing_run_is_refused(trained_run: Path, tiny_dataset: Path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, trained_run, "--resume", "--vae.channels", "8,8,16")
    assert exit_info.value.code == 2
    assert "vae.channels" in capsys.readouterr().err


def test_resume_reads_the_runs_splits_even_when_the_dataset_gained_a_scan(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys
) -> None:
    """A scan added to the data folder after the run started is in no split of its splits.json: a resume
    keeps the run's own splits (drawing new ones would move scans between train and val mid-run) and so
    refuses, naming the scan, with splits.json and the checkpoints untouched."""
    data, run_dir = Path(shutil.copytree(tiny_dataset, tmp_path / "AD_NC")), Path(shutil.copytree(trained_run, tmp_path / "run"))
    first = sorted((data / "train" / "AD").iterdir())[0].name.split("_")[0]
    for path in sorted((data / "train" / "AD").glob(f"{first}_*.jpeg")):
        shutil.copy(path, path.with_name(path.name.replace(first, "199999")))
    before = {name: (run_dir / name).read_bytes() for name in ("splits.json", "vae.pt", "unet.pt")}
    try:
        run_train(data, run_dir, "--resume")
        code = 0
    except SystemExit as exit_:
        code = exit_.code
    err = capsys.readouterr().err
    assert code == 2 and "199999" in err and "splits.json" in err, (
        f"a resume into a data folder with a new scan did not keep the run's splits.json (exit {code}): {err or 'no error'}"
    )
    for name, content in before.items():
        assert (run_dir / name).read_bytes() == content, f"the refused resume rewrote {name}"


def test_checkpoint_from_another_config_is_refused(trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    other = tmp_path / "other"
    run_train(tiny_dataset, other, "--stage", "vae", "--vae.channels", "8,8,16", "--vae_train.epochs", "1")
    (other / "vae.pt").write_bytes((trained_run / "vae.pt").read_bytes())
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, other, "--stage", "unet", "--vae.channels", "8,8,16", "--vae_train.epochs", "1")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "another config" in err and "vae.channels" in err and "Traceback" not in err


class EpochSpy:
    """Stands in for train.train_one_epoch: records every call's name, the model, optimizer and
    LR-schedule state it starts from, the UNet weights after every step (for the EMA arithmetic)
    and, per training batch, the latents handed to NoiseScheduler.training_loss and the conditions
    the UNet then received (after guidance dropout); `stop_at` names the epoch during which the
    run is killed."""

    def __init__(self, monkeypatch):
        self.real_epoch, self.real_loss = train.train_one_epoch, NoiseScheduler.training_loss
        self.calls: list[str] = []
        self.start: dict[str, dict] = {}
        self.steps: dict[str, list[dict]] = {}
        self.batches: dict[str, list[tuple]] = {}
        self.stop_at: str | None = None
        self.batch = None
        monkeypatch.setattr(train, "train_one_epoch", self.train_one_epoch)
        spy = self
        monkeypatch.setattr(
            NoiseScheduler,
            "training_loss",
            lambda scheduler, model, x0, conditions, **kwargs: spy.training_loss(scheduler, model, x0, conditions, **kwargs),
        )

    def train_one_epoch(self, name, model, batches, num_batches, compute_loss, optimizer, lr_schedule, *args, **kwargs):
        self.calls.append(name)
        self.start[name] = {
            "model": copy.deepcopy(model.state_dict()),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "lr_step": lr_schedule.last_epoch,
        }
        if name == self.stop_at:
            raise KeyboardInterrupt
        after_step = kwargs.pop("after_step", lambda: None)
        steps, seen = self.steps.setdefault(name, []), self.batches.setdefault(name, [])

        def recorded_step() -> None:
            steps.append({k: p.detach().clone() for k, p in model.named_parameters()})
            after_step()

        def recorded_loss(batch):
            if isinstance(batch[-1], Conditions):  # a UNet batch: (mean, logvar, conditions)
                mean, logvar, conditions = batch
                self.batch = mean, logvar, conditions.labels, conditions.slice_position
            else:
                self.batch = batch
            self.seen = seen
            try:
                return compute_loss(batch)
            finally:
                self.batch = None

        return self.real_epoch(
            name, model, batches, num_batches, recorded_loss, optimizer, lr_schedule, *args, after_step=recorded_step, **kwargs
        )

    def training_loss(self, scheduler, model, x0, conditions, **kwargs):
        if self.batch is None:  # validation, not a training step
            return self.real_loss(scheduler, model, x0, conditions, **kwargs)
        received = []

        def recording_model(x, t, used):
            received.append(used)
            return model(x, t, used)

        loss = self.real_loss(scheduler, recording_model, x0, conditions, **kwargs)
        (used,) = received
        self.seen.append(
            (
                self.batch,
                x0.detach().clone(),
                used.labels.clone(),
                None if used.slice_position is None else used.slice_position.clone(),
            )
        )
        return loss


def assert_same(a, b, path: str = "") -> None:
    """Bit-identical nested dicts/lists of tensors and plain values."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def ema_arithmetic(start: dict, steps: list[dict], done: int, decay: float) -> dict:
    """EMA's documented update, shadow ← d·shadow + (1 − d)·weights with d = min(decay, (1+n)/(10+n))."""
    shadow = {k: v.clone() for k, v in start.items()}
    for n, weights in enumerate(steps, start=done + 1):
        d = min(decay, (1 + n) / (10 + n))
        for k in shadow:
            shadow[k].lerp_(weights[k], 1 - d)
    return shadow


def test_resume_mid_vae_and_mid_unet_continues_from_the_checkpoints(tiny_dataset: Path, tmp_path: Path, monkeypatch) -> None:
    """Killed during VAE epoch 2, then during UNet epoch 2: each resume trains only the remaining
    epochs, from the checkpoint's weights, optimizer and step, and ends bit-identical to an
    uninterrupted run (EMA included); the EMA follows its arithmetic over the recorded steps."""
    # The uninterrupted run is trained here, beside the resumed one, rather than taken from the session's
    # fixture: libraries other tests import (UMAP's numba) can change how later float sums round.
    trained_run = tmp_path / "straight"
    run_train(tiny_dataset, trained_run)
    run_dir = tmp_path / "resumed"
    spy = EpochSpy(monkeypatch)
    spy.stop_at = "vae 2/2"
    with pytest.raises(SystemExit, match="^130$"):  # a kill mid-epoch: Ctrl-C ends train.py with 128 + SIGINT
        run_train(tiny_dataset, run_dir)
    assert spy.calls == ["vae 1/2", "vae 2/2"] and not (run_dir / "unet.pt").exists()
    vae_epoch1 = load_checkpoint(run_dir / "vae.pt")
    assert vae_epoch1["epoch"] == 1

    spy.calls, spy.stop_at = [], "unet 2/2"
    with pytest.raises(SystemExit, match="^130$"):  # a kill mid-epoch: Ctrl-C ends train.py with 128 + SIGINT
        run_train(tiny_dataset, run_dir, "--resume")
    assert spy.calls == ["vae 2/2", "unet 1/2", "unet 2/2"]
    resumed_at = spy.start["vae 2/2"]
    assert_same(resumed_at["model"], vae_epoch1["model"])
    assert_same(resumed_at["optimizer"], vae_epoch1["optimizer"])
    assert resumed_at["lr_step"] == vae_epoch1["step"] == vae_epoch1["lr_schedule"]["last_epoch"] > 0
    unet_epoch1 = load_checkpoint(run_dir / "unet.pt")
    assert unet_epoch1["epoch"] == 1

    spy.calls, spy.stop_at = [], None
    run_train(tiny_dataset, run_dir, "--resume")
    assert spy.calls == ["unet 2/2"]
    resumed_at = spy.start["unet 2/2"]
    assert_same(resumed_at["model"], unet_epoch1["model"])
    assert_same(resumed_at["optimizer"], unet_epoch1["optimizer"])
    assert resumed_at["lr_step"] == unet_epoch1["step"] == len(spy.steps["unet 1/2"])

    for name in ("vae.pt", "unet.pt"):
        resumed, straight = load_checkpoint(run_dir / name), load_checkpoint(trained_run / name)
        assert resumed["epoch"] == straight["epoch"] == 2
        for key in ("model", "optimizer", "lr_schedule", "step") + (("ema",) if name == "unet.pt" else ()):
            assert_same(resumed[key], straight[key], key)

    def drop_speed(lines):  # what the clock measured differs between any two runs
        return [{k: v for k, v in json.loads(line).items() if k not in ("images_per_second", "seconds")} for line in lines]

    assert drop_speed((run_dir / "history.jsonl").read_text().splitlines()) == drop_speed(
        (trained_run / "history.jsonl").read_text().splitlines()
    )

    # EMA: starts as the initial UNet, is updated after every optimizer step, and survives the resume.
    unet_final = load_checkpoint(run_dir / "unet.pt")
    initial = {k: v for k, v in spy.start["unet 1/2"]["model"].items() if k in spy.steps["unet 1/2"][0]}
    decay = unet_final["ema"]["decay"]
    steps1, steps2 = spy.steps["unet 1/2"], spy.steps["unet 2/2"]
    assert unet_epoch1["ema"]["num_updates"] == len(steps1) and unet_final["ema"]["num_updates"] == len(steps1) + len(steps2)
    expected1 = ema_arithmetic(initial, steps1, 0, decay)
    expected2 = ema_arithmetic(expected1, steps2, len(steps1), decay)
    for name in initial:
        torch.testing.assert_close(unet_epoch1["ema"]["model"][name], expected1[name], rtol=1e-5, atol=1e-7, msg=name)
        torch.testing.assert_close(unet_final["ema"]["model"][name], expected2[name], rtol=1e-5, atol=1e-7, msg=name)
    ema, raw = unet_final["ema"]["model"], unet_final["model"]
    assert max(float((ema[k] - raw[k]).abs().max()) for k in initial) > 1e-4, "EMA weights equal the raw weights"
    assert max(float((ema[k] - initial[k]).abs().max()) for k in initial) > 1e-4, "EMA weights never moved"

    # Stage 2 draws a fresh latent z = μ + σ·ε from the cached posterior every step, and drops
    # labels and slice positions (to Conditions.ABSENT) together at the configured rate.
    scale = float(load_checkpoint(run_dir / "vae.pt")["model"]["scale_factor"])
    draws: dict[bytes, list[torch.Tensor]] = {}
    epsilons, dropped = [], 0
    for name in ("unet 1/2", "unet 2/2"):
        assert spy.batches[name], name
        for (mean, logvar, labels, slices), latents, used_labels, used_slices in spy.batches[name]:
            epsilons.append((latents / scale - mean) / torch.exp(0.5 * logvar))
            for i in range(len(mean)):
                draws.setdefault(mean[i].numpy().tobytes(), []).append(latents[i])
            kept = used_labels != Conditions.ABSENT
            dropped += int((~kept).sum())
            assert torch.equal(used_labels[kept], labels[kept])
            if used_slices is not None:  # slice conditioning on
                assert torch.equal(used_slices[kept], slices[kept]) and (used_slices[~kept] == Conditions.ABSENT).all()
    # (the tiny set repeats images across scans, so equal posteriors also come from different items)
    assert sum(len(z) for z in draws.values()) == 2 * len(spy.batches["unet 1/2"]) * len(spy.batches["unet 1/2"][0][2])
    assert all(len({z.numpy().tobytes() for z in group}) == len(group) for group in draws.values()), (
        "an item's latent was reused instead of drawn afresh"
    )
    epsilon = torch.cat([e.flatten() for e in epsilons])
    assert abs(float(epsilon.mean())) < 0.1 and 0.9 < float(epsilon.std()) < 1.1
    assert 0 < dropped < 0.3 * sum(len(z) for z in draws.values())


@pytest.fixture(scope="module")
def one_vae_epoch(tiny_dataset: Path, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("one_epoch") / "run"
    run_train(tiny_dataset, run_dir, "--stage", "vae", "--vae_train.epochs", "1")
    return run_dir


def test_crash_while_saving_a_checkpoint_keeps_the_previous_one(
    one_vae_epoch: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    run_dir = tmp_path / "run"
    shutil.copytree(one_vae_epoch, run_dir)
    good = (run_dir / "vae.pt").read_bytes()
    real_save = torch.save

    def crash_mid_write(obj, f, *args, **kwargs):
        real_save(obj, f, *args, **kwargs)
        Path(f).write_bytes(Path(f).read_bytes()[:100])  # half-written, then the process dies
        raise OSError("No space left on device")

    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(SystemExit) as exit_info:  # the error boundary turns an OSError into one line
        run_train(tiny_dataset, run_dir, "--stage", "vae", "--resume", "--vae_train.epochs", "2")
    assert exit_info.value.code == 2 and "No space left on device" in capsys.readouterr().err
    assert (run_dir / "vae.pt").read_bytes() == good
    assert not [p for p in run_dir.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"], "temporary file left behind"


def test_nan_loss_stops_and_keeps_last_good_checkpoint(
    one_vae_epoch: Path, tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys
) -> None:
    run_dir = tmp_path / "nan"
    shutil.copytree(one_vae_epoch, run_dir)
    good = (run_dir / "vae.pt").read_bytes()
    real_loss = train.vae_loss
    monkeypatch.setattr(train, "vae_loss", lambda *a, **k: (real_loss(*a, **k)[0] * float("nan"), {}))
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, run_dir, "--stage", "vae", "--resume", "--vae_train.epochs", "2")
    assert exit_info.value.code == 1
    err = capsys.readouterr().err
    assert "nan" in err and "intact" in err
    assert (run_dir / "vae.pt").read_bytes() == good


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--vae.nonsense", "3"], "unknown option"),
        (["--vae_train.epochs", "three"], "invalid literal"),
    ],
)
def test_bad_arguments(tiny_dataset: Path, tmp_path: Path, argv, message, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, tmp_path / "bad", *argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--batch-size", "100"], "--vae_train.batch_size 100 is larger than the training split (40 images)"),
        (["--stage", "unet", "--unet_train.batch_size", "41"], "--unet_train.batch_size 41 is larger than the training split"),
    ],
)
def test_a_batch_larger_than_the_training_split_is_refused_before_training(
    tiny_dataset: Path, tmp_path: Path, argv: list[str], message: str, capsys
) -> None:
    """drop_last would make every epoch zero steps, and the run would still print done."""
    with pytest.raises(SystemExit) as exit_info:
        run_train(tiny_dataset, tmp_path / "run", *argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err and "lower --batch-size to at most 40" in err
    assert not (tmp_path / "run").exists()


def test_missing_dataset_is_one_line_exit_2(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "train.py", "--data-dir", str(tmp_path / "none"), "--run", str(tmp_path / "run")],
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr and "project_setup.py --demo" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


# Appended to the workers' sitecustomize: every AdamW is recorded, every backward's loss logged, and
# at exit each rank writes a hash of each optimizer's parameters and its first loss to DUMP<rank>.
DDP_PROBE = """
import atexit, hashlib, json, torch
_optimizers, _losses = [], []
class _RecordedAdamW(torch.optim.AdamW):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        _optimizers.append(self)
torch.optim.AdamW = _RecordedAdamW
_backward = torch.Tensor.backward
def _logged_backward(self, *args, **kwargs):
    _losses.append(float(self))
    return _backward(self, *args, **kwargs)
torch.Tensor.backward = _logged_backward
def _dump():
    if 'RANK' not in os.environ:
        return
    hashes = []
    for optimizer in _optimizers:
        digest = hashlib.sha256()
        for group in optimizer.param_groups:
            for p in group['params']:
                digest.update(p.detach().cpu().numpy().tobytes())
        hashes.append(digest.hexdigest())
    with open(DUMP + os.environ['RANK'], 'w') as f:
        json.dump({'params': hashes, 'first_loss': _losses[0] if _losses else None}, f)
atexit.register(_dump)
"""


def test_torchrun_two_cpu_processes_only_rank0_writes(tiny_dataset: Path, tmp_path: Path) -> None:
    """gloo DDP with 2 processes; a sitecustomize logs every atomic rename with the writer's rank,
    and each rank's parameters after training: the ranks train on different data (their first
    losses differ), so equal parameters prove DDP averaged the gradients."""
    hook = tmp_path / "hook"
    hook.mkdir()
    log = tmp_path / "writes.log"
    (hook / "sitecustomize.py").write_text(
        "import os\n"
        "_replace = os.replace\n"
        "def _logged(src, dst, *a, **k):\n"
        f"    with open({str(log)!r}, 'a') as f: f.write(os.environ.get('RANK', '?') + ' ' + str(dst) + '\\n')\n"
        "    return _replace(src, dst, *a, **k)\n"
        "os.replace = _logged\n" + DDP_PROBE.replace("DUMP", repr(str(tmp_path / "rank")))
    )
    run_dir = tmp_path / "ddp"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(hook), str(REPO)]), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node=2",
            "--master_port=29533",
            "train.py",
            "--data-dir",
            str(tiny_dataset),
            "--run-dir",
            str(run_dir),
            "--device",
            "cpu",
            *TINY,
            "--vae_train.epochs",
            "1",
            "--unet_train.epochs",
            "1",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    writers = {line.split()[0] for line in log.read_text().splitlines() if str(run_dir) in line}
    assert writers == {"0"}
    for name in ("vae.pt", "unet.pt", "history.jsonl", "diffusion_loss.png"):
        assert (run_dir / name).is_file()
    assert load_checkpoint(run_dir / "unet.pt")["epoch"] == 1
    rank0, rank1 = (json.loads((tmp_path / f"rank{r}").read_text()) for r in (0, 1))
    assert len(rank0["params"]) == 2, "expected one AdamW per stage"
    assert rank0["first_loss"] != rank1["first_loss"], "both ranks saw the same first batch"
    assert rank0["params"] == rank1["params"], "parameters differ across ranks: gradients were not synchronised"


# ============================================================================ the training step, unit by unit


class FakeBar:
    """Stands in for tqdm: iterates, and records its arguments and every set_postfix."""

    made: list[FakeBar] = []

    def __init__(self, iterable, **kwargs):
        self.iterable, self.kwargs, self.postfixes = iterable, kwargs, []
        FakeBar.made.append(self)

    def __iter__(self):
        return iter(self.iterable)

    def set_postfix(self, **values):
        self.postfixes.append(values)


def test_train_one_epoch_steps_clips_schedules_logs_and_averages(monkeypatch) -> None:
    """Plain SGD on a linear model, so every update can be written down: gradients are zeroed every
    step, clipped to grad_clip, the LR schedule steps after each optimizer step, after_step sees
    the updated weights, and the loss, images/s and progress-bar figures are exact."""
    FakeBar.made = []
    monkeypatch.setattr(train, "tqdm", FakeBar)
    clock = iter([100.0] + [102.0] * 50)
    monkeypatch.setattr(train, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    model = nn.Linear(3, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[0.5, -1.0, 2.0]]))
    model.eval()
    batches = [torch.tensor([[1.0, 2.0, 0.5], [0.1, -0.2, 0.3]]) * (k + 1) for k in range(5)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 / (step + 1))
    stage = StageConfig(grad_clip=0.3)
    after = []

    w = model.weight.detach().clone()
    expected_losses, expected_weights = [], []
    for k, x in enumerate(batches):
        expected_losses.append(float((x @ w.T).sum()))
        gradient = x.sum(0, keepdim=True)
        gradient = gradient * min(1.0, 0.3 / (float(gradient.norm()) + 1e-6))
        w = w - 0.5 / (k + 1) * gradient
        expected_weights.append(w)

    loss, images_per_second = train.train_one_epoch(
        "unit 1/1",
        model,
        batches,
        5,
        lambda x: (model(x).sum(), len(x)),
        optimizer,
        schedule,
        stage,
        Runtime(torch.device("cpu")),
        2,
        after_step=lambda: after.append(model.weight.detach().clone()),
    )
    assert model.training
    assert loss == pytest.approx(sum(expected_losses) / 5, rel=1e-6)
    assert images_per_second == 10 / 2.0
    assert schedule.last_epoch == 5
    assert len(after) == 5
    for got, want in zip(after, expected_weights):
        torch.testing.assert_close(got, want)
    (bar,) = FakeBar.made
    assert bar.iterable is batches
    assert bar.kwargs == {"total": 5, "desc": "unit 1/1", "disable": False, "leave": False, "dynamic_ncols": True}
    running = [sum(expected_losses[:n]) / n for n in (2, 4, 5)]
    assert [p["loss"] for p in bar.postfixes] == [f"{value:.4f}" for value in running]
    assert [p["img_s"] for p in bar.postfixes] == ["2", "4", "5"]  # 4, 8, 10 images in 2 s

    FakeBar.made = []
    clock = iter([100.0] + [102.0] * 50)
    train.train_one_epoch(
        "rank 1",
        model,
        batches[:1],
        1,
        lambda x: (model(x).sum(), len(x)),
        optimizer,
        schedule,
        stage,
        Runtime(torch.device("cpu"), rank=1),
        2,
    )
    assert FakeBar.made[0].kwargs["disable"] is True


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_train_one_epoch_stops_on_a_non_finite_loss(bad: float) -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    runtime, stage = Runtime(torch.device("cpu")), StageConfig()
    batches = [torch.ones(1, 2) * k for k in range(5)]

    def loss_of(x):
        value = model(x).sum()
        return (value * 0 + bad if x[0, 0] == 2 else value), 1

    with pytest.raises(train.TrainingDiverged, match=f"^run 1/1: loss became {bad} at step 4 of the epoch$"):
        train.train_one_epoch("run 1/1", model, batches, 5, loss_of, optimizer, schedule, stage, runtime, 2)
    with pytest.raises(train.TrainingDiverged, match=f"^run 1/1: loss became {bad} at step 5 of the epoch$"):
        train.train_one_epoch("run 1/1", model, batches, 5, loss_of, optimizer, schedule, stage, runtime, 100)
    # no logging step inside the epoch (num_batches larger than the batches): the final check catches it
    with pytest.raises(train.TrainingDiverged, match=f"^run 1/1: loss became {bad}$"):
        train.train_one_epoch("run 1/1", model, batches, 7, loss_of, optimizer, schedule, stage, runtime, 100)


def test_learning_rate_warms_up_then_follows_a_cosine_to_min_lr_ratio() -> None:
    model = nn.Sequential(nn.Linear(3, 4), nn.LayerNorm(4), nn.Linear(4, 2))
    model[2].bias.requires_grad_(False)
    stage = StageConfig(epochs=2, lr=2.0, weight_decay=0.05, warmup_steps=4, min_lr_ratio=0.1)
    optimizer, schedule = train.make_optimizer(model, stage, steps_per_epoch=10)  # 20 steps, 4 of warm-up
    assert isinstance(optimizer, torch.optim.AdamW)
    decayed, plain = optimizer.param_groups
    assert [id(p) for p in decayed["params"]] == [id(model[0].weight), id(model[2].weight)]
    assert [id(p) for p in plain["params"]] == [id(model[0].bias), id(model[1].weight), id(model[1].bias)]
    assert (decayed["weight_decay"], plain["weight_decay"]) == (0.05, 0.0)
    assert optimizer.defaults["betas"] == (0.9, 0.999) and optimizer.defaults["fused"] is True

    lrs = []
    for _ in range(25):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:5] == pytest.approx([0.5, 1.0, 1.5, 2.0, 2.0])
    assert lrs[12] == pytest.approx(2.0 * 0.55)  # halfway through the cosine: 0.1 + 0.9 · 0.5
    assert lrs[20:] == pytest.approx([0.2] * 5)  # min_lr_ratio, held after the last step
    for step in range(4, 21):
        progress = (step - 4) / 16
        assert lrs[step] == pytest.approx(2.0 * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))), step
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))

    # warm-up is capped at half of all steps
    stage = StageConfig(epochs=1, lr=2.0, warmup_steps=100, min_lr_ratio=0.1)
    optimizer, schedule = train.make_optimizer(model, stage, steps_per_epoch=10)
    lrs = []
    for _ in range(11):
        lrs.append(schedule.get_last_lr()[0])
        optimizer.step()
        schedule.step()
    assert lrs[:6] == pytest.approx([0.4, 0.8, 1.2, 1.6, 2.0, 2.0])
    assert lrs[10] == pytest.approx(0.2)


def test_seed_epoch_differs_by_seed_epoch_and_rank_and_repeats() -> None:
    def draw(seed: int, epoch: int, rank: int) -> tuple[float, ...]:
        train.seed_epoch(seed, epoch, rank)
        return tuple(torch.rand(4).tolist())

    assert draw(3, 5, 1) == draw(3, 5, 1)
    draws = {draw(s, e, r) for s in range(3) for e in range(6) for r in range(4)}
    assert len(draws) == 3 * 6 * 4


def test_prepare_for_training_wraps_as_configured(tmp_path: Path) -> None:
    config = make_config("demo")
    model = nn.Conv2d(2, 4, 3)
    assert train.prepare_for_training(model, config, Runtime(torch.device("cpu"))) is model
    assert model.weight.is_contiguous(), "channels-last is for CUDA only"

    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        wrapped = train.prepare_for_training(model, config, Runtime(torch.device("cpu"), rank=0, world_size=2))
        assert isinstance(wrapped, nn.parallel.DistributedDataParallel) and wrapped.module is model
        assert wrapped.device_ids is None
    finally:
        torch.distributed.destroy_process_group()

    config.run.compile = "full"
    compiled = train.prepare_for_training(model, config, Runtime(torch.device("cpu")))
    assert compiled is not model and compiled._orig_mod is model


def test_a_one_batch_epoch_reports_that_batch_loss() -> None:
    model = nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    batch = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    expected = float(model(batch).sum().detach())
    loss, _ = train.train_one_epoch(
        "one 1/1",
        model,
        [batch],
        1,
        lambda x: (model(x).sum(), len(x)),
        optimizer,
        schedule,
        StageConfig(),
        Runtime(torch.device("cpu")),
        1,
    )
    assert loss == pytest.approx(expected)


def test_start_stage_shuffles_drops_the_last_partial_batch_and_seeds_the_loader(tmp_path: Path) -> None:
    """The loader of a stage: shuffled by the run's seed (and epoch), full batches only, this rank's shard."""
    config = make_config("tiny")
    config.run.seed, config.vae_train.batch_size = 5, 3
    dataset = torch.utils.data.TensorDataset(torch.arange(10.0))
    model = nn.Linear(1, 1)
    stage = train.start_stage("vae", model, dataset, config, Runtime(torch.device("cpu")), False, tmp_path / "vae.pt")
    shard, batches = stage.loader.sampler.sampler, stage.loader.sampler
    assert (shard.shuffle, shard.drop_last, shard.seed, shard.rank, shard.num_replicas) == (True, True, 5, 0, 1)
    assert (batches.batch_size, batches.drop_last, len(stage.loader)) == (3, True, 3)
    assert not stage.loader.pin_memory, "pinned memory is for CUDA runs only"
    assert stage.trained is model and stage.settings is config.vae_train and stage.name == "vae"
    assert (stage.start_epoch, stage.step, stage.history, stage.restored) == (0, 0, [], {})
    assert stage.optimizer.param_groups[0]["lr"] == pytest.approx(config.vae_train.lr / config.vae_train.warmup_steps)


@pytest.mark.parametrize(
    "flags, computes", [("avx2 avx512f avx512_bf16", True), ("avx2 amx_bf16 amx_tile", True), ("avx2 avx512f avx512bw", False)]
)
def test_bf16_in_hardware_is_read_from_the_cpu_flags(tmp_path: Path, flags: str, computes: bool) -> None:
    cpuinfo = tmp_path / "cpuinfo"
    cpuinfo.write_text(f"processor\t: 0\nflags\t\t: fpu sse2 {flags}\n\nprocessor\t: 1\nflags\t\t: fpu sse2 {flags}\n")
    assert utils.cpu_computes_bf16(cpuinfo) is computes
    assert utils.cpu_computes_bf16(tmp_path / "no_such_file") is False


def test_a_stage_autocasts_when_asked_and_the_device_computes_bf16(monkeypatch) -> None:
    runtime = utils.start_runtime("cpu")
    assert runtime.bf16 is False
    for computes in (True, False):
        monkeypatch.setattr(utils, "cpu_computes_bf16", lambda computes=computes: computes)
        assert runtime.with_bf16(True).bf16 is computes
        assert runtime.with_bf16(False).bf16 is False
    tiny, demo = make_config("tiny"), make_config("demo")
    assert not tiny.vae_train.bf16 and not tiny.unet_train.bf16, "the tests' preset must compute float32 on every CPU"
    assert not demo.vae_train.bf16 and demo.unet_train.bf16


def test_the_log_names_each_stages_precision(tiny_dataset: Path, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(utils, "cpu_computes_bf16", lambda: True)
    run_train(tiny_dataset, tmp_path / "run", "--stage", "vae", "--vae_train.epochs", "1", "--vae_train.bf16", "true")
    assert "(vae bf16 autocast, unet float32)" in capsys.readouterr().out


def test_a_cpu_bf16_training_step_computes_the_float32_losses() -> None:
    """Autocast changes the precision, not the losses: the demo preset's VAE (Fourier and SSIM terms) and
    UNet (attention, label tokens) at 32 px, the same weights and draws in float32 and in bf16 on the CPU."""
    config = make_config("demo")
    torch.manual_seed(0)
    vae, unet = AutoencoderKL(config.vae), UNet(config.unet, config.vae.latent_channels)
    scheduler = NoiseScheduler(config.scheduler)
    images, conditions = torch.rand(4, 1, 32, 32) * 2 - 1, Conditions(torch.tensor([0, 1, 0, 1]))
    losses = []
    for bf16 in (False, True):
        with Runtime(torch.device("cpu"), bf16=bf16).autocast():
            recon, mean, logvar = vae(images, sample_posterior=False)
            vae_total = vae_loss(images, recon, mean, logvar, config.vae)[0]
            latents = mean.detach().float()
            unet_total = scheduler.training_loss(unet, latents, conditions, generator=torch.Generator().manual_seed(1))
        (vae_total + unet_total).backward()
        assert recon.dtype == (torch.bfloat16 if bf16 else torch.float32)
        assert all(torch.isfinite(p.grad).all() for p in [*vae.parameters(), *unet.parameters()] if p.grad is not None)
        losses.append(torch.stack([vae_total, unet_total]).detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=0.01, atol=0)
