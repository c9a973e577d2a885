"""Golden run: a tiny run trained and sampled with fixed seeds gives bit-identical weights, images and
metrics to the ones recorded in tests/golden/tiny_run.json.

It pins behaviour across refactors: moving code between modules must not change a single bit of what
the scripts produce. A deliberate change of behaviour (a new default, another RNG draw order)
regenerates the record, in its own commit that says why:

    BRAINLDM_WRITE_GOLDEN=1 python -m pytest -q tests/test_golden.py
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from threadpoolctl import threadpool_limits

import evaluate
import predict
import train
from conftest import make_tiny_dataset
from utils import load_checkpoint

GOLDEN = Path(__file__).parent / "golden" / "tiny_run.json"

# Frozen here rather than taken from conftest.TINY, so that retuning the shared tiny config for speed
# never changes what this record means. Slice conditioning is on, so that path is pinned too.
GOLDEN_CONFIG = [
    "--preset",
    "demo",
    "--data.image_size",
    "32",
    "--data.cache_dir",
    "none",
    "--vae.channels",
    "8,16,16",
    "--vae.num_res_blocks",
    "1",
    "--unet.channels",
    "16,32",
    "--unet.attention_levels",
    "false,true",
    "--unet.num_res_blocks",
    "1",
    "--unet.head_dim",
    "8",
    "--unet.context_dim",
    "16",
    "--unet.slice_conditioning",
    "true",
    "--unet.label_tokens",  # one label token, as when the record was made, whatever the demo preset says
    "1",
    "--vae_train.epochs",
    "2",
    "--vae_train.batch_size",
    "8",
    "--vae_train.warmup_steps",
    "2",
    "--unet_train.epochs",
    "2",
    "--unet_train.batch_size",
    "8",
    "--unet_train.warmup_steps",
    "2",
    "--run.sample_every",
    "2",
    "--run.grid_samples",
    "2",
    "--run.sample_steps",
    "3",
    "--run.log_every",
    "2",
    "--run.seed",
    "7",
    "--device",
    "cpu",
]


def tensor_digest(state: dict) -> str:
    """sha256 over every tensor of a (nested) state dict, keys in sorted order."""
    digest = hashlib.sha256()

    def visit(prefix: str, value: object) -> None:
        if isinstance(value, torch.Tensor):
            digest.update(prefix.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        elif isinstance(value, dict):
            for key in sorted(value, key=str):
                visit(f"{prefix}.{key}", value[key])

    visit("", state)
    return digest.hexdigest()


def image_digests(folder: Path) -> dict[str, str]:
    """Relative PNG path → sha256 of its decoded pixels (not the file bytes, which encoders may vary)."""
    return {
        str(path.relative_to(folder)): hashlib.sha256(np.asarray(Image.open(path)).tobytes()).hexdigest()
        for path in sorted(folder.rglob("*.png"))
    }


def produce(root: Path) -> dict:
    """Train, predict with both samplers (and a slice), evaluate: everything the record pins."""
    data = make_tiny_dataset(root / "AD_NC", {"train/AD": 5, "train/NC": 5, "test/AD": 2, "test/NC": 2})
    run_dir = root / "run"
    train.main([*GOLDEN_CONFIG, "--data-dir", str(data), "--run", str(run_dir)])
    record: dict = {
        "weights": {
            "vae": tensor_digest(load_checkpoint(run_dir / "vae.pt")["model"]),
            "unet": tensor_digest(load_checkpoint(run_dir / "unet.pt")["model"]),
            "ema": tensor_digest(load_checkpoint(run_dir / "unet.pt")["ema"]),
        },
        "training_grids": image_digests(run_dir / "samples"),
        "history_losses": [
            [entry["train_loss"], entry["val_loss"]]
            for entry in map(json.loads, (run_dir / "history.jsonl").read_text().splitlines())
        ],
    }
    common = ["--run", str(run_dir), "--device", "cpu", "--num-samples", "3", "--batch-size", "2", "--seed", "11"]
    predict.main([*common, "--label", "both", "--steps", "4", "--out", str(root / "ddim"), "--sequence"])
    predict.main([*common, "--label", "AD", "--sampler", "ddpm", "--steps", "5", "--out", str(root / "ddpm")])
    predict.main([*common, "--label", "NC", "--steps", "3", "--guidance", "1.5", "--slice", "71", "--out", str(root / "slice")])
    for name in ("ddim", "ddpm", "slice"):
        record[f"predict_{name}"] = image_digests(root / name)
    evaluate.main(["--run", str(run_dir), "--device", "cpu", "--num-samples", "4", "--steps", "2", "--batch-size", "3"])
    metrics = json.loads((run_dir / "metrics.json").read_text())
    record["evaluate"] = {"groups": metrics["groups"], "anatomy": metrics["anatomy"]}
    return record


@pytest.fixture
def one_thread():
    """Float sums split across threads round differently: one thread for torch and for the BLAS behind
    numpy/scipy makes the record the same on any number of cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with threadpool_limits(limits=1):
        yield
    torch.set_num_threads(threads)


def test_tiny_run_is_bit_identical_to_the_record(tmp_path: Path, one_thread) -> None:
    produced = json.loads(json.dumps(produce(tmp_path)))  # the same float repr as the stored record
    if os.environ.get("BRAINLDM_WRITE_GOLDEN") == "1":
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(produced, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"wrote {GOLDEN}; commit it with the reason for the change")
    expected = json.loads(GOLDEN.read_text())
    for part in expected:
        assert produced[part] == expected[part], f"{part} differs from the golden record"
    assert produced.keys() == expected.keys()
