"""bench.py: the table on a tiny model with and without diffusers, the matched peer, refusing to overwrite."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
from pathlib import Path

import pytest
import torch

import bench
from modules import Conditions, NoiseScheduler
from pipeline import build_unet

TINY = [
    "--preset",
    "tiny",
    "--batch-size",
    "4",
    "--device",
    "cpu",
    "--repeats",
    "1",
    "--warmup",
    "0",
    "--train-steps",
    "1",
    "--sample-count",
    "2",
    "--sample-steps",
    "2",
]
THROUGHPUT_ROWS = (
    "VAE training, 32 px (images/s)",
    "UNet training, cached latents (images/s)",
    "UNet training, latents encoded on the fly (images/s)",
    "DDIM sampling, 2 images × 2 steps, guidance 2 (images/s)",
)
needs_diffusers = pytest.mark.skipif(importlib.util.find_spec("diffusers") is None, reason="diffusers not installed")


def table_rows(page: str) -> dict[str, list[str]]:
    """Measurement name → its other cells, from the Markdown table in `page`."""
    rows = [line.strip("|").split("|") for line in page.splitlines() if line.startswith("| ") and not line.startswith("| ---")]
    return {cells[0].strip(): [cell.strip() for cell in cells[1:]] for cells in rows}


def check_rows(rows: dict[str, list[str]], columns: int) -> None:
    for name in THROUGHPUT_ROWS:
        assert name in rows, name
        assert float(rows[name][0].split()[0]) > 0, name
        assert f"peak memory, {name.removesuffix(' (images/s)')} (MiB)" in rows
    assert "UNet parameters" in rows and "VAE parameters" in rows
    assert all(len(cells) == columns - 1 for cells in rows.values())  # every row fills every column


@needs_diffusers
def test_table_with_diffusers(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.md"
    bench.main([*TINY, "--out", str(out)])
    page = out.read_text()
    assert page in capsys.readouterr().out
    rows = table_rows(page)
    ours, peer, ratio = rows["measurement"]
    assert ours == "ours" and peer.startswith("diffusers ") and ratio == "ours / diffusers"
    check_rows(rows, columns=4)
    for name in THROUGHPUT_ROWS[1:]:  # the VAE has no peer
        assert float(rows[name][1].split()[0]) > 0 and rows[name][2].endswith("x"), name
    ours_parameters, peer_parameters = rows["UNet parameters"][:2]
    assert ours_parameters == peer_parameters
    assert "preset tiny" in page.splitlines()[0] and "--preset tiny" in page.splitlines()[0]
    assert not list(tmp_path.glob(".*.tmp")), "a temporary file was left behind"


def test_table_without_diffusers(tmp_path: Path, monkeypatch, capsys) -> None:
    def missing() -> None:
        raise ImportError("No module named 'diffusers'")

    monkeypatch.setattr(bench, "import_diffusers", missing)
    out = tmp_path / "bench.md"
    out.write_text("an older table\n")
    leftover = tmp_path / f".bench.md.{socket.gethostname()}-{dead_pid()}-abcd1234.tmp"  # of a bench.py killed mid-write
    leftover.write_text("half a table")
    bench.main([*TINY, "--out", str(out), "--overwrite"])
    page = out.read_text()
    assert not leftover.exists()
    assert "diffusers not installed: peer column skipped" in capsys.readouterr().out
    assert "diffusers not installed: peer column skipped" in page
    rows = table_rows(page)
    assert rows["measurement"] == ["ours"]
    check_rows(rows, columns=2)


def test_existing_output_needs_overwrite(tmp_path: Path, capsys) -> None:
    out = tmp_path / "bench.md"
    out.write_text("an older table\n")
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, "--out", str(out)])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip()
    assert "--overwrite" in error and len(error.splitlines()) == 1
    assert out.read_text() == "an older table\n"


def dead_pid() -> int:
    process = subprocess.Popen(["true"])
    process.wait()
    return process.pid


def test_an_out_that_cannot_be_written_is_refused_before_the_benchmark(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder.md").mkdir()
    (tmp_path / "data" / "demo" / "AD_NC").mkdir(parents=True)  # the demo preset's dataset folder, relative to here
    cases = [
        (["--out", "folder.md", "--overwrite"], "--out folder.md is a folder, where a file is to be written"),
        (
            ["--preset", "demo", "--out", "data/demo/AD_NC/bench.md"],
            "--out data/demo/AD_NC/bench.md lies inside the dataset folder",
        ),
    ]
    for argv, message in cases:
        with pytest.raises(SystemExit) as exit_info:
            bench.main([*TINY, *argv])
        output = capsys.readouterr()
        errors = output.err.strip().splitlines()
        assert exit_info.value.code == 2 and len(errors) == 1 and errors[0].startswith(f"error: {message}")
        assert "benchmarking" not in output.out
    assert sorted(str(path.relative_to(tmp_path)) for path in tmp_path.rglob("*")) == [
        "data",
        "data/demo",
        "data/demo/AD_NC",
        "folder.md",
    ]


@pytest.mark.parametrize("argument", ["--repeats=0", "--sample-steps=1001", "--batch-size=0"])
def test_bad_arguments_exit_2(argument: str, tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        bench.main([*TINY, argument, "--out", str(tmp_path / "bench.md")])
    assert exit_info.value.code == 2
    assert not (tmp_path / "bench.md").exists()


@needs_diffusers
@pytest.mark.parametrize("preset, patch_size", [("demo", 1), ("tiny", 1), ("demo", 2)])
def test_peer_matches_our_unet(preset: str, patch_size: int) -> None:
    """Same parameter count, the same output shape, and a head width equal to ours at every attention."""
    config = bench.bench_config(bench.parse_args(["--preset", preset]))
    config.unet.patch_size = patch_size
    side = config.data.image_size // config.vae.downsample_factor
    peer = bench.build_peer(bench.import_diffusers(), config.unet, config.vae.latent_channels, side)
    assert bench.count_parameters(peer) == bench.count_parameters(build_unet(config))
    heads = [m for m in peer.modules() if type(m).__name__ == "Attention"]
    assert heads and all(m.inner_dim // m.heads == config.unet.head_dim for m in heads)
    x = torch.randn(2, config.vae.latent_channels, side, side)
    assert peer(x, torch.tensor([0, 999]), Conditions(torch.tensor([0, Conditions.ABSENT]))).shape == x.shape


@needs_diffusers
@pytest.mark.parametrize("prediction_type, beta_schedule", [("epsilon", "scaled_linear"), ("v", "cosine")])
def test_peer_scheduler_samples_as_ours(prediction_type: str, beta_schedule: str) -> None:
    """diffusers' DDIMScheduler, as bench.py sets it up, takes the same steps as our DDIM sampler."""
    config = bench.bench_config(bench.parse_args(["--preset", "tiny"]))
    config.scheduler.prediction_type, config.scheduler.beta_schedule = prediction_type, beta_schedule
    diffusers = bench.import_diffusers()
    side = config.data.image_size // config.vae.downsample_factor
    torch.manual_seed(0)
    peer = bench.build_peer(diffusers, config.unet, config.vae.latent_channels, side).eval()
    ours, ddim = NoiseScheduler(config.scheduler), bench.build_peer_scheduler(diffusers, config.scheduler)
    ddim.set_timesteps(10)
    assert ddim.timesteps.tolist() == ours.timesteps(10)
    labels = torch.tensor([0, 1, 0])
    runtime = bench.Runtime(torch.device("cpu"))
    theirs = bench.sample_with_peer(
        peer, ddim, config, labels, runtime, steps=10, guidance_scale=3.0, generator=torch.Generator().manual_seed(1)
    )
    mine = ours.sample(
        peer,
        (3, *bench.latent_shape(config)),
        Conditions(labels),
        num_steps=10,
        guidance_scale=3.0,
        generator=torch.Generator().manual_seed(1),
    )
    torch.testing.assert_close(theirs, mine, atol=1e-4, rtol=1e-4)


def test_profile_on_the_tiny_preset_writes_its_summary(tmp_path: Path, capsys) -> None:
    """--profile on a CPU: per-step figures of UNet training and guided sampling and their top ops,
    printed and written; the GPU rows say — where there is no GPU."""
    out = tmp_path / "profile.md"
    bench.main([*TINY, "--profile", "--out", str(out)])
    page = out.read_text()
    assert page in capsys.readouterr().out
    rows = table_rows(page)
    assert rows["per step"] == ["UNet training", "guided DDIM sampling"]
    for name in ("wall time per step (ms)", "host time per step, not waiting for the device (ms)"):
        assert all(float(cell) > 0 for cell in rows[name]), name
    assert rows["device busy share"] == ["—", "—"] and int(rows["top-level CPU ops per step"][0]) > 0
    assert "Top CPU ops, UNet training" in page and "Top CPU ops, guided DDIM sampling" in page
    assert "`aten::conv2d`" in page and "--profile" in page.splitlines()[0]


def test_covered_length_merges_overlapping_intervals() -> None:
    assert bench.covered_length([(0, 2), (1, 3), (5, 6), (5.5, 5.75)]) == 4
    assert bench.covered_length([]) == 0
