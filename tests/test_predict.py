"""predict.py: label parsing, determinism, both samplers, outputs, EMA weights, slice conditioning, UMAP, bad inputs."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import predict
from config import read_config
from conftest import run_train
from pipeline import Pipeline, load_run
from utils import Runtime, UsageError, load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


def run_predict(run_dir: Path, out: Path, *extra: str) -> None:
    predict.main(
        [
            "--run",
            str(run_dir),
            "--out",
            str(out),
            "--steps",
            "3",
            "--num-samples",
            "3",
            "--batch-size",
            "2",
            "--device",
            "cpu",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    "text, labels",
    [("0", [0]), ("1", [1]), ("AD", [0]), ("ad", [0]), ("NC", [1]), ("nc", [1]), ("both", [0, 1]), ("BOTH", [0, 1])],
)
def test_label_spellings(text: str, labels: list[int]) -> None:
    assert predict.parse_label(text) == labels


def test_repeated_labels_are_deduplicated() -> None:
    args = predict.build_parser().parse_args(["--label", "NC", "--label", "0", "--label", "1"])
    assert predict.check_arguments(args) == [1, 0]


@pytest.mark.parametrize("text", ["2", "-1", "MCI", "", "A D", "²", "١"])
def test_unknown_label_is_refused(text: str) -> None:
    with pytest.raises(UsageError, match="unknown label"):
        predict.parse_label(text)


def test_outputs_and_sizes(trained_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    run_predict(trained_run, out, "--label", "both", "--sequence", "--real")
    for name in ("AD", "NC"):
        files = sorted((out / name).glob("*.png"))
        assert len(files) == 3
        with Image.open(files[0]) as image:
            assert image.mode == "L" and image.size == (32, 32)
        assert (out / f"samples_{name}.png").is_file() and (out / f"real_{name}.png").is_file()
    assert (out / "denoising_sequence.png").is_file()
    record = json.loads((out / "samples.json").read_text())
    assert record["settings"]["seed"] == 0 and record["settings"]["steps"] == 3
    assert len(record["images"]) == 6 and {r["class"] for r in record["images"]} == {"AD", "NC"}


def pixels(folder: Path) -> list[np.ndarray]:
    return [np.asarray(Image.open(path)) for path in sorted(folder.rglob("AD_*.png"))]


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_same_seed_same_images(trained_run: Path, tmp_path: Path, sampler: str) -> None:
    run_predict(trained_run, tmp_path / "a", "--label", "AD", "--sampler", sampler, "--seed", "5")
    run_predict(trained_run, tmp_path / "b", "--label", "AD", "--sampler", sampler, "--seed", "5")
    run_predict(trained_run, tmp_path / "c", "--label", "AD", "--sampler", sampler, "--seed", "6")
    first, again, other = pixels(tmp_path / "a"), pixels(tmp_path / "b"), pixels(tmp_path / "c")
    assert len(first) == 3
    assert all(np.array_equal(x, y) for x, y in zip(first, again, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(first, other, strict=True))


def test_existing_outputs_need_overwrite(trained_run: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "out"
    run_predict(trained_run, out, "--label", "NC")
    before = (out / "samples_NC.png").read_bytes()
    with pytest.raises(SystemExit) as exit_info:
        run_predict(trained_run, out, "--label", "NC", "--seed", "9")
    assert exit_info.value.code == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "samples_NC.png").read_bytes() == before
    run_predict(trained_run, out, "--label", "NC", "--seed", "9", "--overwrite")
    assert (out / "samples_NC.png").read_bytes() != before


def test_umap_writes_plot_and_scores(trained_run: Path, tmp_path: Path) -> None:
    from sklearn.metrics import silhouette_score

    out = tmp_path / "umap"
    run_predict(trained_run, out, "--label", "both", "--umap", "--umap-count", "8")
    assert (out / "umap.png").is_file()
    report = json.loads((out / "umap_scores.json").read_text())
    assert set(report) == {"timestep", "groups"} and report["timestep"] == predict.UMAP_TIMESTEP == 250
    scores = report["groups"]
    assert set(scores) == {"real (true label)", "generated (asked-for label)", "control: real, labels swapped"}
    for group in scores.values():
        assert set(group) == {"silhouette_umap", "silhouette_features", "count"}
    # The tiny test split has 8 slices per label (all taken), and 3 samples per label were generated.
    assert {name: group["count"] for name, group in scores.items()} == {
        "real (true label)": 16,
        "generated (asked-for label)": 6,
        "control: real, labels swapped": 16,
    }

    # Recompute the feature-space silhouettes: the real group is the real test latents passed with their
    # true labels, the control the *same* latents passed to the UNet with the labels swapped. Silhouette is
    # invariant to renaming the labels, so a control that only recoloured the points (passing the true
    # labels to the UNet) would not match the swapped-label recomputation below.
    pipe = load_run(trained_run, Runtime(CPU))
    images = [predict.real_test_slices(pipe.config, label, 8, 0) for label in (0, 1)]
    labels = torch.cat([torch.full((len(batch),), label, dtype=torch.long) for label, batch in enumerate(images)])
    latents = pipe.encode(torch.cat(images))
    for name, passed in (("real (true label)", labels), ("control: real, labels swapped", 1 - labels)):
        features = predict.bottleneck_features(pipe, latents, passed, 0).numpy()
        assert scores[name]["silhouette_features"] == pytest.approx(
            silhouette_score(features, passed.numpy()), rel=1e-4, abs=1e-6
        )


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--label", "MCI"], "unknown label"),
        (["--label", "AD", "--steps", "0"], "--steps must be at least 1"),
        (["--label", "AD", "--guidance", "-1"], "--guidance -1.0: must be a number from 0 to 30"),
        (["--label", "AD", "--num-samples", "0"], "--num-samples must be at least 1"),
        (["--label", "AD", "--slice", "80"], "without slice conditioning"),
        (["--label", "AD", "--sampler", "euler"], "invalid choice"),
        ([], "--label"),
    ],
)
def test_bad_input_one_line_exit_2(trained_run: Path, tmp_path: Path, argv: list[str], message: str) -> None:
    result = subprocess.run(
        [sys.executable, "predict.py", "--run", str(trained_run), "--out", str(tmp_path / "o"), *argv],
        check=False,
        cwd=REPO,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_missing_or_incomplete_run(trained_run: Path, tmp_path: Path, capsys) -> None:
    for broken, message in ((tmp_path / "nowhere", "not found"), (tmp_path / "half", "no unet.pt")):
        if broken.name == "half":
            broken.mkdir()
            for name in ("config.json", "vae.pt"):
                (broken / name).write_bytes((trained_run / name).read_bytes())
        with pytest.raises(SystemExit) as exit_info:
            run_predict(broken, tmp_path / "o", "--label", "AD")
        assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_out_that_is_a_file_is_refused(trained_run: Path, tmp_path: Path, capsys) -> None:
    target = tmp_path / "file.png"
    target.write_bytes(b"x")
    with pytest.raises(SystemExit) as exit_info:
        run_predict(trained_run, target, "--label", "AD")
    assert exit_info.value.code == 2 and "is a file, where a folder is to be written" in capsys.readouterr().err


# ----------------------------------------------------------------------------- EMA weights


def perturbed(weights: dict) -> dict:
    """Every floating-point tensor moved by unit Gaussian noise (a deliberately different set of weights)."""
    generator = torch.Generator().manual_seed(123)
    return {
        key: value + torch.randn(value.shape, generator=generator, dtype=value.dtype) if value.is_floating_point() else value
        for key, value in weights.items()
    }


def run_with_unet_state(trained_run: Path, folder: Path, edit) -> Path:
    """A private copy of the trained run whose unet.pt checkpoint was changed by `edit(state)`."""
    shutil.copytree(trained_run, folder)
    state = load_checkpoint(folder / "unet.pt")
    edit(state)
    save_checkpoint(state, folder / "unet.pt")
    return folder


def test_sampling_uses_the_ema_weights(trained_run: Path, tmp_path: Path) -> None:
    state = load_checkpoint(trained_run / "unet.pt")
    raw, ema = state["model"], state["ema"]["model"]
    # After training, the EMA and the raw weights differ; the loaded UNet holds exactly the EMA ones.
    assert any(not torch.equal(raw[key], ema[key]) for key in raw)
    loaded = load_run(trained_run, Runtime(CPU)).unet.state_dict()
    assert set(loaded) == set(ema) and all(torch.equal(loaded[key], ema[key]) for key in ema)

    def noisy_raw(state: dict) -> None:
        state["model"] = perturbed(state["model"])

    def noisy_ema(state: dict) -> None:
        state["ema"]["model"] = perturbed(state["ema"]["model"])

    raw_changed = run_with_unet_state(trained_run, tmp_path / "raw_changed", noisy_raw)
    ema_changed = run_with_unet_state(trained_run, tmp_path / "ema_changed", noisy_ema)
    loaded = load_run(raw_changed, Runtime(CPU)).unet.state_dict()
    assert all(torch.equal(loaded[key], ema[key]) for key in ema)

    for run_dir, out in ((trained_run, "original"), (raw_changed, "raw_changed"), (ema_changed, "ema_changed")):
        predict.main(
            [
                "--run",
                str(run_dir),
                "--out",
                str(tmp_path / out),
                "--steps",
                "2",
                "--num-samples",
                "2",
                "--device",
                "cpu",
                "--label",
                "AD",
                "--seed",
                "3",
            ]
        )
    original, with_raw_changed, with_ema_changed = (pixels(tmp_path / out) for out in ("original", "raw_changed", "ema_changed"))
    assert len(original) == 2
    # Changing the raw weights changes nothing; changing the EMA weights changes the images.
    assert all(np.array_equal(x, y) for x, y in zip(original, with_raw_changed, strict=True))
    assert not any(np.array_equal(x, y) for x, y in zip(original, with_ema_changed, strict=True))


# ----------------------------------------------------------------------------- slice conditioning


@pytest.fixture(scope="module")
def slice_run(tiny_dataset: Path, tmp_path_factory) -> Path:
    """The TINY model trained with slice conditioning, one epoch per stage (train slices 70-73)."""
    run_dir = tmp_path_factory.mktemp("runs") / "tiny_slice"
    run_train(tiny_dataset, run_dir, "--unet.slice_conditioning", "true", "--vae_train.epochs", "1", "--unet_train.epochs", "1")
    return run_dir


def test_slice_conditioning_end_to_end(slice_run: Path, tmp_path: Path, monkeypatch) -> None:
    calls = []  # (slice positions passed to the sampler, the latents it returned)
    real_sample = Pipeline.sample

    def spy(pipe, conditions, **kwargs):
        latents = real_sample(pipe, conditions, **kwargs)
        calls.append((conditions.slice_position, latents.clone()))
        return latents

    monkeypatch.setattr(Pipeline, "sample", spy)
    latents = {}
    for slice_index, tag in ((70, "70"), (71, "71"), (73, "73"), (73, "73 again")):
        out = tmp_path / tag.replace(" ", "_")
        calls.clear()
        extra = ("--sequence",) if tag == "70" else ()  # the sequence samples with the slice token too
        predict.main(
            [
                "--run",
                str(slice_run),
                "--out",
                str(out),
                "--steps",
                "3",
                "--num-samples",
                "2",
                "--device",
                "cpu",
                "--label",
                "AD",
                "--slice",
                str(slice_index),
                *extra,
            ]
        )
        ((positions, latents[tag]),) = calls  # one batch
        # --slice is normalised over the training slices' range (70-73) and passed for every image.
        assert positions.tolist() == pytest.approx([(slice_index - 70) / 3] * 2)
        assert json.loads((out / "samples.json").read_text())["settings"]["slice"] == slice_index
        assert len(pixels(out)) == 2
    assert (tmp_path / "70" / "denoising_sequence.png").is_file()
    assert torch.equal(latents["73"], latents["73 again"])  # the same slice and seed: the same samples
    for first, second in (("70", "71"), ("70", "73"), ("71", "73")):
        assert not torch.equal(latents[first], latents[second]), f"--slice {first} and {second} gave the same samples"


def test_a_slice_outside_the_training_slices_is_refused(slice_run: Path, tmp_path: Path, capsys) -> None:
    """It used to be clamped to the nearest end without a word."""
    with pytest.raises(SystemExit) as exit_info:
        predict.main(
            ["--run", str(slice_run), "--out", str(tmp_path / "out"), "--label", "AD", "--slice", "200", "--device", "cpu"]
        )
    assert exit_info.value.code == 2
    assert "--slice 200: the run was trained on slices 70 to 73; choose one of those" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_real_slices_skip_an_unreadable_image(trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys) -> None:
    data = Path(shutil.copytree(tiny_dataset, tmp_path / "AD_NC"))
    damaged = sorted((data / "test" / "AD").iterdir())[0]
    damaged.write_bytes(damaged.read_bytes()[:200])  # a truncated JPEG
    run_dir = Path(shutil.copytree(trained_run, tmp_path / "run"))
    config = json.loads((run_dir / "config.json").read_text())
    config["data"]["data_dir"] = str(data)
    (run_dir / "config.json").write_text(json.dumps(config))
    predict.main(
        [
            "--run",
            str(run_dir),
            "--out",
            str(tmp_path / "out"),
            "--label",
            "AD",
            "--num-samples",
            "8",
            "--steps",
            "2",
            "--device",
            "cpu",
            "--real",
        ]
    )
    assert f"skipped an unreadable test slice: {damaged}" in capsys.readouterr().out
    with Image.open(tmp_path / "out" / "real_AD.png") as grid:  # 7 readable slices of 32 px, 8 per row
        assert grid.size == (7 * 34 + 2, 34 + 2)


def test_steps_default_to_the_run_for_its_sampler_and_to_the_samplers_own_otherwise(trained_run: Path, tmp_path: Path) -> None:
    """Without --steps: the run's run.sample_steps for its own sampler, every diffusion step for DDPM
    (it is DDPM only with all of them) and 50 for another sampler, as samples.json records."""
    config = read_config(trained_run)
    expected = {
        config.run.sampler: config.run.sample_steps,
        "ddpm": config.scheduler.num_train_timesteps,
        next(name for name in ("ddim", "dpmpp_2m") if name != config.run.sampler): 50,
    }
    for sampler, steps in expected.items():
        out = tmp_path / sampler
        predict.main(["--run", str(trained_run), "--out", str(out), "--label", "AD", "--num-samples", "1", "--sampler", sampler])
        settings = json.loads((out / "samples.json").read_text())["settings"]
        assert (settings["sampler"], settings["steps"]) == (sampler, steps)


# ----------------------------------------------------------------------------- counterfactuals


def run_counterfactual(run_dir: Path, out: Path, *extra: str) -> dict:
    predict.main(["--run", str(run_dir), "--out", str(out), "--steps", "4", "--batch-size", "3", "--device", "cpu", *extra])
    return json.loads((out / "counterfactuals.json").read_text())


def test_counterfactual_outputs_per_slice_grid_and_record(trained_run: Path, tiny_dataset: Path, tmp_path: Path) -> None:
    test_folder = tiny_dataset / "test"
    record = run_counterfactual(trained_run, tmp_path / "out", "--counterfactual", str(test_folder), "--to", "AD")
    inputs = sorted(test_folder.rglob("*.jpeg"))
    assert [Path(entry["input"]) for entry in record["slices"]] == inputs
    assert [entry["source_label"] for entry in record["slices"]] == [path.parent.name for path in inputs]
    assert {entry["source_from"] for entry in record["slices"]} == {"folder"}
    settings = record["settings"]
    assert (
        settings["target"] == "AD"
        and settings["method"] == "ddim-inversion"
        and settings["strength"] == 0.3
        and settings["guidance"] == 3.0
    )
    assert (settings["seed"], settings["steps"], settings["batch_size"], settings["sampler"]) == (0, 4, 3, "ddim")
    assert [entry["batch"] for entry in record["slices"]][:4] == [0, 0, 0, 1]
    for entry in record["slices"]:
        assert set(entry["csf_dark_share"]) == {"source", "reconstruction", "counterfactual"}
        for kind, name in entry["files"].items():
            with Image.open(tmp_path / "out" / name) as image:
                assert image.size == (32, 32) and image.mode == ("RGB" if kind == "difference" else "L")
    assert (tmp_path / "out" / "counterfactuals.png").is_file()
    assert len(list((tmp_path / "out").glob("*.png"))) == 4 * len(inputs) + 1


def test_counterfactual_to_the_source_label_gives_back_the_reconstruction(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    record = run_counterfactual(
        trained_run, out, "--counterfactual", str(tiny_dataset / "test" / "NC"), "--to", "nc", "--strength", "0.3"
    )
    for entry in record["slices"]:
        reconstruction, edited = (
            np.asarray(Image.open(out / entry["files"][kind]), int) for kind in ("reconstruction", "counterfactual")
        )
        assert np.abs(edited - reconstruction).max() <= 1


def test_counterfactual_from_overrides_the_folder_and_sdedit_follows_the_seed(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    slice_file = str(sorted((tiny_dataset / "test" / "AD").iterdir())[0])
    common = ("--counterfactual", slice_file, "--to", "NC", "--method", "sdedit")
    first = run_counterfactual(trained_run, tmp_path / "a", *common, "--from", "NC", "--seed", "1")
    assert first["slices"][0]["source_label"] == "NC" and first["slices"][0]["source_from"] == "--from"
    run_counterfactual(trained_run, tmp_path / "b", *common, "--seed", "1")
    run_counterfactual(trained_run, tmp_path / "c", *common, "--seed", "2")
    edited = [(tmp_path / name / first["slices"][0]["files"]["counterfactual"]).read_bytes() for name in "abc"]
    assert edited[0] == edited[1] != edited[2]
    with pytest.raises(SystemExit):  # the outputs exist now
        run_counterfactual(trained_run, tmp_path / "a", *common)


def test_counterfactual_steps_and_guidance_are_their_own_not_the_runs(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path
) -> None:
    """The tiny run samples with 3 steps at guidance 2; counterfactuals default to DDIM 50 at guidance 3."""
    slice_file = str(sorted((tiny_dataset / "test" / "AD").iterdir())[0])
    predict.main(
        ["--run", str(trained_run), "--out", str(tmp_path / "o"), "--counterfactual", slice_file, "--to", "NC", "--device", "cpu"]
    )
    settings = json.loads((tmp_path / "o" / "counterfactuals.json").read_text())["settings"]
    assert (settings["steps"], settings["guidance"], settings["strength"], settings["sampler"]) == (50, 3.0, 0.3, "ddim")


def counterfactual_bad_inputs(tmp_path: Path, tiny_dataset: Path) -> dict[str, tuple[list[str], str]]:
    slice_file = str(sorted((tiny_dataset / "test" / "AD").iterdir())[0])
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / "empty").mkdir()
    (tmp_path / "broken.jpeg").write_bytes(b"\xff\xd8 truncated")
    return {
        "text file": (["--counterfactual", str(tmp_path / "notes.txt"), "--to", "AD"], "notes.txt"),
        "broken image": (["--counterfactual", str(tmp_path / "broken.jpeg"), "--to", "AD"], "pass image slices"),
        "empty folder": (["--counterfactual", str(tmp_path / "empty"), "--to", "AD"], "holds no images"),
        "missing path": (["--counterfactual", str(tmp_path / "nowhere"), "--to", "AD"], "not found"),
        "--to MCI": (["--counterfactual", slice_file, "--to", "MCI"], "--to 'MCI': use AD (or 0) or NC (or 1)"),
        "--to both": (["--counterfactual", slice_file, "--to", "both"], "--to 'both'"),
        "--from CN": (["--counterfactual", slice_file, "--to", "AD", "--from", "CN"], "--from 'CN'"),
        "no --to": (["--counterfactual", slice_file], "needs --to AD or --to NC"),
        "strength 0": (
            ["--counterfactual", slice_file, "--to", "AD", "--strength", "0"],
            "--strength 0.0: use a number in (0, 1]",
        ),
        "strength 1.5": (["--counterfactual", slice_file, "--to", "AD", "--strength", "1.5"], "(0, 1]"),
        "strength nan": (["--counterfactual", slice_file, "--to", "AD", "--strength", "nan"], "(0, 1]"),
        "--to alone": (["--label", "AD", "--to", "NC"], "--to only apply with --counterfactual"),
        "options alone": (["--label", "AD", "--strength", "0.5", "--method", "sdedit"], "--strength, --method only apply"),
        "with --label": (["--counterfactual", slice_file, "--to", "AD", "--label", "AD"], "--label do not apply"),
        "with --sampler": (["--counterfactual", slice_file, "--to", "AD", "--sampler", "ddpm"], "drop --sampler and --eta"),
        "bad method": (["--counterfactual", slice_file, "--to", "AD", "--method", "magic"], "invalid choice"),
    }


@pytest.mark.parametrize(
    "case",
    ["text file", "broken image", "empty folder", "missing path", "--to MCI", "--to both", "--from CN", "no --to", "strength 0"]
    + ["strength 1.5", "strength nan", "--to alone", "options alone", "with --label", "with --sampler", "bad method"],
)
def test_counterfactual_bad_input_one_line_exit_2(
    trained_run: Path, tiny_dataset: Path, tmp_path: Path, capsys, case: str
) -> None:
    argv, message = counterfactual_bad_inputs(tmp_path, tiny_dataset)[case]
    with pytest.raises(SystemExit) as exit_info:
        predict.main(["--run", str(trained_run), "--out", str(tmp_path / "o"), "--device", "cpu", *argv])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and message in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "o").exists()
