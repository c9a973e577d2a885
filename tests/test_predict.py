"""predict.py: label parsing, determinism, both samplers, outputs, UMAP, bad inputs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import predict
from utils import UsageError

REPO = Path(__file__).resolve().parents[1]


def run_predict(run_dir: Path, out: Path, *extra: str) -> None:
    predict.main(["--run", str(run_dir), "--out", str(out), "--steps", "3", "--num-samples", "3",
                  "--batch-size", "2", "--device", "cpu", *extra])


@pytest.mark.parametrize(
    "text, labels",
    [("0", [0]), ("1", [1]), ("AD", [0]), ("ad", [0]), ("NC", [1]), ("nc", [1]), ("both", [0, 1]), ("BOTH", [0, 1])],
)
def test_label_spellings(text: str, labels: list[int]) -> None:
    assert predict.parse_label(text) == labels


def test_repeated_labels_are_deduplicated() -> None:
    args = predict.build_parser().parse_args(["--label", "NC", "--label", "0", "--label", "1"])
    assert predict.check_arguments(args) == [1, 0]


@pytest.mark.parametrize("text", ["2", "-1", "MCI", "", "A D"])
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
    out = tmp_path / "umap"
    run_predict(trained_run, out, "--label", "both", "--umap", "--umap-count", "8")
    assert (out / "umap.png").is_file()
    scores = json.loads((out / "umap_scores.json").read_text())["groups"]
    assert set(scores) == {"real (true label)", "generated (asked-for label)", "control: real, labels swapped"}
    for group in scores.values():
        assert -1.0 <= group["silhouette_umap"] <= 1.0 and -1.0 <= group["silhouette_features"] <= 1.0
    assert scores["real (true label)"]["count"] == 16 and scores["generated (asked-for label)"]["count"] == 6


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--label", "MCI"], "unknown label"),
        (["--label", "AD", "--steps", "0"], "--steps must be at least 1"),
        (["--label", "AD", "--guidance", "-1"], "--guidance must be 0 or more"),
        (["--label", "AD", "--num-samples", "0"], "--num-samples must be at least 1"),
        (["--label", "AD", "--slice", "80"], "without slice conditioning"),
        (["--label", "AD", "--sampler", "euler"], "invalid choice"),
        ([], "--label"),
    ],
)
def test_bad_input_one_line_exit_2(trained_run: Path, tmp_path: Path, argv: list[str], message: str) -> None:
    result = subprocess.run([sys.executable, "predict.py", "--run", str(trained_run), "--out", str(tmp_path / "o"), *argv],
                            cwd=REPO, capture_output=True, text=True)
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
    with pytest.raises(SystemExit):
        run_predict(trained_run, target, "--label", "AD")
    assert "is not a folder" in capsys.readouterr().err
