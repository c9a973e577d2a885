"""Small helpers shared by the scripts: seeding, device choice, atomic writes, image grids, plots.

Nothing here knows about brains or diffusion; each function is a few lines a script would
otherwise repeat.
"""

from __future__ import annotations

import json
import os
import random
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, NoReturn

import numpy as np


class UsageError(Exception):
    """A problem with the user's input (arguments, data, run folder): exit 2 with one line."""


def fail(message: str) -> NoReturn:
    """Print a one-line error to stderr and exit with status 2 (usage or data error)."""
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


@contextmanager
def usage_errors_exit() -> Iterator[None]:
    """Turn a UsageError raised inside the block into `fail(message)`: no traceback for bad input."""
    try:
        yield
    except UsageError as error:
        fail(str(error))


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(requested: str = "auto") -> "torch.device":
    """`auto` → CUDA when available, else CPU; anything else is passed to torch.device."""
    import torch

    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested} asked for, but CUDA is not available; use --device cpu")
    return device


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path`; on success rename it onto `path` in one step.

    A crash or a full disk mid-write leaves the old file intact and no half-written file behind.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        yield temp_path
        os.replace(temp_path, path)
    finally:
        temp_path.unlink(missing_ok=True)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temp_path:
        temp_path.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def to_uint8(images: "np.ndarray | torch.Tensor") -> np.ndarray:
    """Images in [-1, 1] (float) or already uint8, shape (N, H, W) or (N, 1, H, W) → uint8 (N, H, W)."""
    import torch

    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy() if images.is_floating_point() else images.cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, 0]
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: "np.ndarray | torch.Tensor", ncols: int = 8, padding: int = 2) -> np.ndarray:
    """Tile N grayscale images into one uint8 array with `padding` black pixels between tiles."""
    tiles = to_uint8(images)
    count, height, width = tiles.shape
    ncols = max(1, min(ncols, count))
    nrows = -(-count // ncols)
    grid = np.zeros(
        (nrows * height + (nrows + 1) * padding, ncols * width + (ncols + 1) * padding), dtype=np.uint8
    )
    for index, tile in enumerate(tiles):
        row, col = divmod(index, ncols)
        top = padding + row * (height + padding)
        left = padding + col * (width + padding)
        grid[top : top + height, left : left + width] = tile
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 (H, W) array as an 8-bit grayscale PNG, atomically."""
    from PIL import Image

    with atomic_path(path) as temp_path:
        Image.fromarray(array, mode="L").save(temp_path, format="PNG")


def save_image_grid(images: "np.ndarray | torch.Tensor", path: str | os.PathLike, ncols: int = 8) -> None:
    save_png(image_grid(images, ncols=ncols), path)


def save_figure(figure: "matplotlib.figure.Figure", path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically and close it (never shown in a window)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as temp_path:
        figure.savefig(temp_path, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def new_figure(*args, **kwargs) -> tuple["matplotlib.figure.Figure", object]:
    """plt.subplots on the non-interactive Agg backend, so no script ever opens a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)
