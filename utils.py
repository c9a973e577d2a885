"""Small helpers shared by the scripts: seeding, device choice, atomic writes, image grids, plots, and a
training run's clock, checkpoint cadence and stop request.

Nothing here knows about brains or diffusion; each function is a few lines a script would
otherwise repeat.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import functools
import json
import os
import random
import re
import resource
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.distributed as dist


class UsageError(Exception):
    """A problem with the user's input (arguments, data, run folder): exit 2 with one line."""


def fail(message: str) -> NoReturn:
    """Print a one-line error to stderr and exit with status 2 (usage or data error)."""
    print(f"error: {one_line(message)}", file=sys.stderr)
    raise SystemExit(2)


def one_line(text: str) -> str:
    """`text` with its control characters (a newline or an escape sequence in a path) and undecodable
    bytes shown escaped (`\\n`, `\\xff`): a message stays one line and prints under any locale."""
    try:
        # Undecodable bytes of a file name arrive as surrogates: show them as the bytes they were.
        text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "backslashreplace").decode("utf-8")
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def display_path(path: str | os.PathLike) -> str:
    """`path` as printable one-line text (see one_line)."""
    return one_line(os.fsdecode(path))


class ArgumentParser(argparse.ArgumentParser):
    """argparse whose errors are one line and exit 2 (argparse's own print the usage first)."""

    def error(self, message: str) -> NoReturn:
        fail(f"{message} (see {self.prog} --help)")


class Stopped(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C's KeyboardInterrupt, so every `finally` (the
    temporary file of an atomic write among them) runs before the process ends."""

    def __init__(self, signal_number: int):
        super().__init__(signal.Signals(signal_number).name)
        self.signal_number = signal_number


def _raise_stopped(number: int, frame: object) -> None:
    raise Stopped(number)


@contextmanager
def usage_errors_exit() -> Iterator[None]:
    """A script's error boundary: a UsageError, an OSError from the machine (a full disk, a read-only
    or unreadable folder) or running out of memory becomes `fail(message)`: one line and exit 2, no
    traceback. SIGTERM, SIGHUP and Ctrl-C end the command with one line and 128 + the signal's number,
    after the temporary files of the writes under way are removed. Every write is atomic, so the file
    that was being replaced is still intact."""
    handled = (signal.SIGTERM, signal.SIGHUP)
    previous = {}
    if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
        previous = {number: signal.signal(number, _raise_stopped) for number in handled}
    try:
        yield
    except UsageError as error:
        fail(str(error))
    except OSError as error:
        fail(describe_os_error(error))
    except (MemoryError, torch.OutOfMemoryError) as error:
        fail(out_of_memory(error))
    except RuntimeError as error:
        if not _ALLOCATION_FAILED.search(str(error)):
            raise
        fail(out_of_memory(error))
    except (Stopped, KeyboardInterrupt) as stop:
        number = stop.signal_number if isinstance(stop, Stopped) else signal.SIGINT
        print(f"\nstopped by {signal.Signals(number).name}; no half-written file is left", file=sys.stderr)
        raise SystemExit(128 + number) from None
    finally:
        for number, handler in previous.items():
            signal.signal(number, handler)


# How torch's CPU allocator words a failed allocation (a RuntimeError, unlike CUDA's OutOfMemoryError).
_ALLOCATION_FAILED = re.compile(r"DefaultCPUAllocator|can't allocate memory|not enough memory")


def out_of_memory(error: BaseException) -> str:
    reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else type(error).__name__
    return f"out of memory ({reason}): lower --batch-size, --data.image_size or --num-samples, or use a machine with more memory"


def memory_limit() -> int:
    """Bytes of memory this process may use at most: the machine's, or less under `ulimit -v` / `-d`
    or a cgroup (a container's or a batch job's) limit."""
    limits = [os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")]
    for kind in (resource.RLIMIT_AS, resource.RLIMIT_DATA):
        soft = resource.getrlimit(kind)[0]
        if soft != resource.RLIM_INFINITY:
            limits.append(soft)
    try:
        limits.append(int(Path("/sys/fs/cgroup/memory.max").read_text()))
    except (OSError, ValueError):  # no cgroup v2 here, or "max"
        pass
    return min(limits)


def check_memory(needed: int, what: str) -> None:
    """A UsageError before allocating `needed` bytes for `what` when this process may not have them."""
    limit = memory_limit()
    if needed > limit:
        raise UsageError(
            f"{what} need {needed / 2**30:.1f} GiB of memory, more than the {limit / 2**30:.1f} GiB this process may use: "
            "lower --data.image_size (ADNI's slices are 256x240) or use a machine with more memory"
        )


def describe_os_error(error: OSError) -> str:
    """One line for an OSError: what failed, on which file, and what to do about it."""
    where = display_path(error.filename) if error.filename else "a file"
    if error.errno == errno.ENOSPC:
        return (
            f"no space left on the device writing {where} ({free_space(error.filename)} free): free some disk space "
            "and run the command again"
        )
    if error.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write or read {where} ({error.strerror}): choose a folder you may write to, or fix its permissions"
    return f"{where}: {error.strerror or error}"


def free_space(path: str | os.PathLike | None) -> str:
    """The free space on the disk that holds `path` (its nearest existing folder), e.g. "1.2 GiB"."""
    folder = Path(path or ".").absolute()
    while not folder.is_dir() and folder != folder.parent:
        folder = folder.parent
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "unknown space"
    return f"{free / 2**30:.2f} GiB" if free >= 2**30 else f"{free / 2**20:.1f} MiB"


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (all devices) so a run can be repeated."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def pick_device(requested: str = "auto") -> torch.device:
    """`auto` → CUDA when available, else CPU; anything else is passed to torch.device."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise UsageError(f"--device {requested}: not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {requested} asked for, but CUDA is not available; use --device cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UsageError(f"--device {requested}: this machine has {torch.cuda.device_count()} GPU(s); use cuda:0 to cuda:N-1")
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"--device {requested}: brainLDM runs on cpu or cuda; use one of those")
    return device


def available_cpus() -> int:
    """The CPU cores this process may run on (its affinity mask where the system has one)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass
class Runtime:
    """Where this process runs, with what precision, and who it is among torchrun's processes."""

    device: torch.device
    rank: int = 0
    world_size: int = 1
    bf16: bool = False

    def __post_init__(self) -> None:
        # Every batch of a run has the same shape, so cuDNN's one-off search for the fastest kernels pays off.
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16, enabled=self.bf16)

    def with_bf16(self, wanted: bool) -> Runtime:
        """This runtime, autocasting to bf16 where `wanted` and the device computes it (`computes_bf16`)."""
        return replace(self, bf16=wanted and computes_bf16(self.device))

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()

    def mean_across_ranks(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            dist.all_reduce(value)
            value /= self.world_size
        return value


@functools.cache
def cpu_computes_bf16(cpuinfo: Path = Path("/proc/cpuinfo")) -> bool:
    """Whether this CPU does bf16 arithmetic in hardware (the AVX512-BF16 or AMX instructions: Intel Xeon
    from Cooper Lake, AMD from Zen 4), by the flags in `cpuinfo`. Without them oneDNN emulates bf16, which
    is slower than float32."""
    try:
        cpu_flags = cpuinfo.read_text()
    except OSError:  # not Linux: assume not, and stay in float32
        return False
    return re.search(r"\b(avx512_bf16|amx_bf16)\b", cpu_flags) is not None


def computes_bf16(device: torch.device) -> bool:
    """Whether bf16 autocast speeds `device` up: on CUDA, and on a CPU with bf16 in hardware, where it made
    the demo's training steps 1.4x (UNet) and 1.7x (VAE) faster (docs/training.md, "bf16 on the CPU")."""
    return device.type == "cuda" or (device.type == "cpu" and cpu_computes_bf16())


def start_runtime(device: str = "auto") -> Runtime:
    """This process's Runtime on `device` (auto, cpu, cuda, ...), in float32 (`Runtime.with_bf16` for a
    stage that autocasts); under torchrun, after joining its process group (NCCL on GPUs, gloo on CPU)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size == 1:
        return Runtime(pick_device(device))
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device != "cpu" and torch.cuda.is_available()
    chosen = torch.device(f"cuda:{local_rank}") if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(chosen)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo")
    return Runtime(chosen, rank, world_size)


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def process_is_alive(pid: int) -> bool:
    """Signal 0 tests that a process exists without sending anything."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # Another user's process: it exists.
    except PermissionError:
        pass
    return True


def _temporary_prefix(path: Path) -> str:
    """`.name.host-pid-`: a temporary file names its writer, so a cleaner can tell a dead writer's
    leftover from the file a live one (another script writing into the same folder) is filling."""
    return f".{path.name}.{socket.gethostname()}-{os.getpid()}-"


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path next to `path` (`.name.host-pid-XXXXXXXX.tmp`); on success rename it onto
    `path` in one step.

    A crash or a full disk mid-write leaves the old file intact and no half-written file behind; a
    kill -9 leaves the temporary file, which `remove_temporary_files` deletes on the next start.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp_name = tempfile.mkstemp(dir=path.parent, prefix=_temporary_prefix(path), suffix=".tmp")
    os.close(handle)
    temp_path = Path(temp_name)
    try:
        yield temp_path
        os.chmod(temp_path, 0o666 & ~_current_umask())  # mkstemp makes files owner-only
        os.replace(temp_path, path)
    except OSError as error:
        if error.errno is None:
            raise
        # Name the file the user knows, not its temporary sibling.
        raise OSError(error.errno, error.strerror, str(path)) from error
    finally:
        temp_path.unlink(missing_ok=True)


def remove_temporary_files(folder: str | os.PathLike, recursive: bool = False) -> int:
    """Delete the temporary files (atomic_path's) that writers which are no longer running left in
    `folder` (and its subfolders when `recursive`): only those made on this host by a process that no
    longer exists, so a live writer's file is never touched, whatever folder it shares. Returns how
    many were deleted."""
    pattern = re.compile(rf"\..+\.{re.escape(socket.gethostname())}-([0-9]+)-[a-z0-9_]+\.tmp")
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    candidates = folder.rglob(".*.tmp") if recursive else folder.glob(".*.tmp")
    removed = 0
    for path in candidates:
        match = pattern.fullmatch(path.name)
        if match and path.is_file() and not process_is_alive(int(match[1])):
            path.unlink(missing_ok=True)
            removed += 1
    return removed


def lock_path(folder: str | os.PathLike) -> Path:
    """The lock file of `folder` (folder_lock's): `.<name>.lock` beside the folder it resolves to."""
    folder = Path(folder).resolve()
    return folder.parent / f".{folder.name}.lock"


def report_removed(count: int, folder: str | os.PathLike) -> None:
    """Say how many temporary files of stopped writers `remove_temporary_files` deleted in `folder`, if any."""
    if count:
        print(f"removed {count} temporary file(s) that stopped writers left in {display_path(folder)}")


@contextmanager
def folder_lock(folder: str | os.PathLike) -> Iterator[None]:
    """Hold an exclusive lock on `folder` while the block runs, so two processes never write one run.

    The lock file is `.<name>.lock` beside the folder, so nothing is written inside it before the
    caller decides to, and it is removed on release. A second holder gets a UsageError naming the
    first one's PID. The operating system drops the lock when its process ends, even by kill -9, so
    it never goes stale. The folder is resolved through symlinks first: a link to a run folder takes
    the lock of the folder itself."""
    import fcntl  # POSIX only, like the rest of the multi-process code

    folder = Path(folder).resolve()
    path = lock_path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    while True:
        handle = open(path, "a+")
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise UsageError(
                f"{display_path(folder)} is in use by process {holder}: wait for it to finish (or stop it), or choose another --run"
            ) from None
        # The previous holder removes the file on release: if it did after this process opened it,
        # the lock just won is on a file no longer there, and the one at `path` must be locked instead.
        try:
            if os.stat(path).st_ino == os.fstat(handle.fileno()).st_ino:
                break
        except FileNotFoundError:
            pass
        handle.close()
    try:
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        yield
    finally:
        path.unlink(missing_ok=True)  # while still holding the lock (see above)
        handle.close()


def umap_embedding(features: np.ndarray, seed: int, n_neighbors: int = 15, min_dist: float = 0.1) -> np.ndarray:
    """2-D UMAP embedding (N, 2) of features (N, D), single-threaded and seeded, so it repeats.

    The first UMAP fit of a process starts numba's OpenMP layer, which resets torch's thread count
    to the core count (1 → 2 under OMP_NUM_THREADS=1) for everything computed after it; the count
    is restored here."""
    import umap

    threads = torch.get_num_threads()
    try:
        return umap.UMAP(n_neighbors=n_neighbors, min_dist=min_dist, random_state=seed, n_jobs=1).fit_transform(features)
    finally:
        torch.set_num_threads(threads)


# Purposes of the hidden sibling folders that fresh_sibling makes: a dataset being built, unpacked or
# converted, and an old one moved aside while its replacement is renamed into place.
SIBLING_PURPOSES = ("building", "unpacking", "converting", "replaced")


def fresh_sibling(path: Path, purpose: str) -> Path:
    """A new hidden folder next to `path` (same file system, so renaming it onto `path` is one step).

    Its name records this host and process, so remove_leftovers can tell a killed run's folder
    from one that a live run is still filling. `purpose` is one of SIBLING_PURPOSES.
    """
    if purpose not in SIBLING_PURPOSES:
        raise ValueError(f"purpose {purpose!r} is not one of {SIBLING_PURPOSES}")
    temp = path.parent / f".{path.name}.{purpose}-{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        temp.mkdir(parents=True)
    except OSError as error:
        raise UsageError(f"cannot create a folder next to {path} ({error}): choose a writable location") from None
    return temp


def remove_leftovers(path: Path) -> list[Path]:
    """Delete the folders (see fresh_sibling) that killed builds, unpackings and conversions of `path` left.

    Only folders whose process is known dead go: one made on this host by a PID that no longer
    exists. Age alone would not do: a build running in another terminal is older than this one.
    (A PID reused since only delays the cleanup to a later run.) Returns the folders removed.
    """
    purposes = "|".join(SIBLING_PURPOSES)
    pattern = re.compile(rf"\.{re.escape(path.name)}\.(?:{purposes})-(.+)-([0-9]{{1,9}})-[0-9a-f]{{8}}")
    try:
        candidates = sorted(path.parent.iterdir()) if path.parent.is_dir() else []
    # Cleaning up is a courtesy; an unreadable folder is reported by whatever needs it next.
    except OSError:
        return []
    removed = []
    for candidate in candidates:
        match = pattern.fullmatch(candidate.name)
        if match and match[1] == socket.gethostname() and not process_is_alive(int(match[2])):
            shutil.rmtree(candidate, ignore_errors=True)
            if not candidate.exists():
                removed.append(candidate)
    return removed


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as temp_path:
        temp_path.write_text(text)


def write_json_atomic(path: str | os.PathLike, data: object) -> None:
    write_text_atomic(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def check_output_paths(
    read_only: Iterable[str | os.PathLike],
    folders: Mapping[str, str | os.PathLike | None] | None = None,
    files: Mapping[str, str | os.PathLike | None] | None = None,
) -> None:
    """The one rule for everything a command writes, checked before it writes anything: no output lies
    inside one of the `read_only` folders (the datasets the command reads: the caller knows which
    those are), each resolved through symlinks; an output folder is not a file, an output file is not
    a folder, and no folder on the way to either is a file. `folders` and `files` map how the user
    named each output (an option such as "--out", or a file's role) to its path (None: not written).

    A file is judged by the folder it lands in: atomic_path replaces a symlink there, never its target.
    The first output that breaks the rule is a UsageError naming it and the fix."""
    roots = [(Path(root), Path(root).resolve()) for root in read_only]
    # Thousands of files share a few folders: each folder is resolved and walked once.
    resolve_folder = functools.cache(Path.resolve)
    file_on_the_way = functools.cache(_file_on_the_way)

    outputs = [(name, Path(path), True) for name, path in (folders or {}).items() if path is not None]
    outputs += [(name, Path(path), False) for name, path in (files or {}).items() if path is not None]
    for name, path, is_folder in outputs:
        real = resolve_folder(path) if is_folder else resolve_folder(path.parent) / path.name
        for root, real_root in roots:
            if real == real_root or real_root in real.parents:
                raise UsageError(
                    f"{name} {display_path(path)} lies inside the dataset folder {display_path(root)}, which brainLDM only "
                    "ever reads (a file written there would be taken for data): choose a place outside it"
                )
        blocker = file_on_the_way(path.parent)
        if blocker is not None:
            raise UsageError(f"{name} {display_path(path)}: {display_path(blocker)} is a file, not a folder: choose another path")
        if path.is_dir() != is_folder and path.exists():
            kind, meant = ("a file", "a folder") if is_folder else ("a folder", "a file")
            raise UsageError(
                f"{name} {display_path(path)} is {kind}, where {meant} is to be written: move it away or choose another path"
            )


def _file_on_the_way(folder: Path) -> Path | None:
    """The first of `folder` and its parents that exists and is not a folder (None: the way is clear)."""
    for candidate in (folder, *folder.parents):
        if candidate.exists():
            return None if candidate.is_dir() else candidate
    return None


def to_uint8(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Images in [-1, 1] (float) or already uint8, shape (N, H, W) or (N, 1, H, W) → uint8 (N, H, W)."""
    if isinstance(images, torch.Tensor):
        images = images.detach().float().cpu().numpy() if images.is_floating_point() else images.cpu().numpy()
    images = np.asarray(images)
    if images.ndim == 4:
        images = images[:, 0]
    if images.dtype == np.uint8:
        return images
    return np.clip(np.round((images + 1.0) * 127.5), 0, 255).astype(np.uint8)


def image_grid(images: np.ndarray | torch.Tensor, ncols: int = 8, padding: int = 2) -> np.ndarray:
    """Tile N grayscale images into one uint8 array with `padding` black pixels between tiles."""
    tiles = to_uint8(images)
    count, height, width = tiles.shape
    ncols = max(1, min(ncols, count))
    nrows = -(-count // ncols)
    grid = np.zeros((nrows * height + (nrows + 1) * padding, ncols * width + (ncols + 1) * padding), dtype=np.uint8)
    for index, tile in enumerate(tiles):
        row, col = divmod(index, ncols)
        top = padding + row * (height + padding)
        left = padding + col * (width + padding)
        grid[top : top + height, left : left + width] = tile
    return grid


def save_png(array: np.ndarray, path: str | os.PathLike) -> None:
    """Write a uint8 (H, W) array as an 8-bit grayscale PNG, or (H, W, 3) as colour, atomically."""
    from PIL import Image

    with atomic_path(path) as temp_path:
        Image.fromarray(array, mode="L" if array.ndim == 2 else "RGB").save(temp_path, format="PNG")


def with_caption(grid: np.ndarray, lines: list[str]) -> np.ndarray:
    """A uint8 image (H, W) with `lines` of white text on a black strip beneath it (PIL's built-in font)."""
    from PIL import Image, ImageDraw

    line_height, character_width = 12, 6  # of PIL's built-in font
    lines = [part for line in lines for part in textwrap.wrap(line, max(10, grid.shape[1] // character_width - 1))]
    canvas = Image.new("L", (grid.shape[1], grid.shape[0] + line_height * len(lines) + 4))
    canvas.paste(Image.fromarray(grid, mode="L"))
    draw = ImageDraw.Draw(canvas)
    for index, line in enumerate(lines):
        draw.text((3, grid.shape[0] + 2 + index * line_height), line, fill=255)
    return np.asarray(canvas)


def save_image_grid(
    images: np.ndarray | torch.Tensor, path: str | os.PathLike, ncols: int = 8, caption: list[str] | None = None
) -> None:
    """Tile images into a grid (utils.image_grid) and write it as a PNG, with caption lines beneath if given."""
    grid = image_grid(images, ncols=ncols)
    save_png(with_caption(grid, caption) if caption else grid, path)


def save_figure(figure, path: str | os.PathLike) -> None:
    """Save a matplotlib figure as PNG atomically and close it (never shown in a window)."""
    import matplotlib.pyplot as plt

    with atomic_path(path) as temp_path:
        figure.savefig(temp_path, format="png", dpi=120, bbox_inches="tight")
    plt.close(figure)


def new_figure(*args, **kwargs) -> tuple:
    """plt.subplots on the non-interactive Agg backend, so no script ever opens a window."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt.subplots(*args, **kwargs)


def save_checkpoint(state: dict, path: str | os.PathLike) -> None:
    """torch.save a dict of state dicts/tensors/numbers atomically (never a pickled module)."""
    with atomic_path(path) as temp_path:
        try:
            torch.save(state, temp_path)
        # torch's zip writer reports a full disk as "[enforce fail at inline_container.cc:...] . unexpected
        # pos ..." or "file write failed", a RuntimeError without an errno.
        except RuntimeError as error:
            reason = str(error).strip().splitlines()[0][:160] if str(error).strip() else "RuntimeError"
            raise UsageError(
                f"writing the checkpoint {display_path(path)} failed ({reason}) with {free_space(path)} free on its disk: "
                "free some disk space and run the command again (the previous checkpoint, if any, is intact)"
            ) from None


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """torch.load with weights_only=True; a file that is not a checkpoint is a UsageError."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except FileNotFoundError:
        raise UsageError(f"checkpoint {display_path(path)} not found") from None
    except OSError as error:
        raise UsageError(f"cannot read {display_path(path)} ({error.strerror}): check the file's permissions") from None
    # Whatever a damaged or foreign file makes the unpickler raise (UnpicklingError, RuntimeError,
    # EOFError, IndexError on plain text, ...), the file is not a checkpoint we can use.
    except Exception as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise UsageError(f"{display_path(path)} is not a readable brainLDM checkpoint ({first_line[:120]})") from None


def plot_curves(
    series: dict[str, tuple[list[float], list[float]]], path: str | os.PathLike, title: str, ylabel: str = "loss"
) -> None:
    """One line per name → (x values, y values), log-scaled when the values span a decade or more."""
    figure, axis = new_figure(figsize=(6, 4))
    for name, (xs, ys) in series.items():
        axis.plot(xs, ys, marker="o", markersize=3, label=name)
    values = [y for _, ys in series.values() for y in ys if y > 0]
    if values and max(values) / min(values) >= 10:
        axis.set_yscale("log")
    axis.set_xlabel("epoch")
    axis.set_ylabel(ylabel)
    axis.set_title(title)
    axis.grid(alpha=0.3)
    axis.legend()
    save_figure(figure, path)


def require_tensorboard() -> type:
    """torch's SummaryWriter class; a UsageError naming the install when the tensorboard package is missing."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise UsageError("--run.tensorboard true needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class TensorBoardLog:
    """Per-epoch scalars and images for TensorBoard (`tensorboard --logdir runs`), written to `folder`.

    A disabled log does nothing, so callers need no `if`. An enabled one checks at once that the
    package is installed, and makes its writer (and folder) at the first write. Steps are epochs:
    `first_epoch`, the first one this process logs, hides what a killed run logged from it on
    (SummaryWriter's purge_step), so a resumed stage draws one line, not two.
    """

    def __init__(self, folder: str | os.PathLike, enabled: bool = True, first_epoch: int = 1):
        self.folder, self.enabled, self.first_epoch = Path(folder), enabled, first_epoch
        self._writer = None
        if enabled:
            require_tensorboard()

    def _writer_now(self):
        if self._writer is None:
            self._writer = require_tensorboard()(log_dir=str(self.folder), purge_step=self.first_epoch)
        return self._writer

    def epoch(self, entry: dict, prefix: str) -> None:
        """Every number of a history entry as `prefix/name` (a dict's as `prefix/name/key`) at step entry["epoch"]."""
        if not self.enabled:
            return
        writer = self._writer_now()
        for tag, value in _numbers(entry, prefix):
            writer.add_scalar(tag, value, entry["epoch"])
        writer.flush()

    def image(self, tag: str, path: str | os.PathLike, epoch: int) -> None:
        """A grayscale figure that was just saved to `path` (a PNG), as image `tag` at step `epoch`."""
        if not self.enabled:
            return
        from PIL import Image

        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L"))
        self._writer_now().add_image(tag, pixels, epoch, dataformats="HW")
        self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


def _numbers(entry: dict, prefix: str) -> Iterator[tuple[str, float]]:
    """(tag, value) for the numbers of a history entry, the epoch and step counters left out."""
    for name, value in entry.items():
        if isinstance(value, dict):
            yield from _numbers(value, f"{prefix}/{name}")
        elif isinstance(value, int | float) and not isinstance(value, bool) and name not in ("epoch", "step"):
            yield f"{prefix}/{name}", float(value)


# ============================================================================ a training run's clock, checkpoint cadence, stop and history

# What a stage's wall time is spent on, besides `other` (start-up, logs, plots, waiting for other ranks).
TIME_CATEGORIES = ("train_steps", "data", "validation", "checkpoints", "sample_grids", "latent_encoding")


class TimeBreakdown:
    """Wall-clock seconds of a stage by TIME_CATEGORIES, each second counted once: a measurement
    inside another is taken out of the outer one, and `other` is what no measurement claimed.

    `close()` ends a span (an epoch's record) and starts the next; `summary()` adds the spans
    closed so far and the open one: the stage's time in this process."""

    def __init__(self, clock: Callable[[], float] = time.perf_counter):
        self.clock = clock
        self.span_started = clock()
        self.span = dict.fromkeys(TIME_CATEGORIES, 0.0)
        self.closed = dict.fromkeys((*TIME_CATEGORIES, "other", "total"), 0.0)
        self.inner: list[float] = []  # seconds of the measurements nested in each open one

    @contextlib.contextmanager
    def measure(self, category: str) -> Iterator[None]:
        self.inner.append(0.0)
        started = self.clock()
        try:
            yield
        finally:
            elapsed = self.clock() - started
            self.span[category] += elapsed - self.inner.pop()
            if self.inner:
                self.inner[-1] += elapsed

    def add(self, category: str, seconds: float) -> None:
        """Count `seconds` timed by the caller, inside the open measurement, as `category`."""
        self.span[category] += seconds
        if self.inner:
            self.inner[-1] += seconds

    def open_span(self, now: float) -> dict[str, float]:
        total = now - self.span_started
        return {**self.span, "other": total - sum(self.span.values()), "total": total}

    def close(self) -> dict[str, float]:
        """Seconds of the span ending now, by category, with `other` and `total`; the next span starts."""
        now = self.clock()
        span = self.open_span(now)
        for key, seconds in span.items():
            self.closed[key] += seconds
        self.span_started, self.span = now, dict.fromkeys(TIME_CATEGORIES, 0.0)
        return {key: round(seconds, 4) for key, seconds in span.items()}

    def summary(self) -> dict[str, float]:
        """Seconds since the stage started in this process, by category, with `other` and `total`."""
        return {key: self.closed[key] + seconds for key, seconds in self.open_span(self.clock()).items()}


def describe_time(stage: str, seconds: dict[str, float]) -> str:
    """One line: the stage's wall time and each category's share of it."""
    total = max(seconds["total"], 1e-9)
    parts = ", ".join(
        f"{key.replace('_', ' ')} {seconds[key]:.1f} s ({100 * seconds[key] / total:.0f}%)" for key in (*TIME_CATEGORIES, "other")
    )
    return f"{stage} time {seconds['total']:.1f} s: {parts}"


class CheckpointCadence:
    """A mid-stage checkpoint is due `minutes` after the last one written (or the stage's start);
    0 makes every epoch's due."""

    def __init__(self, minutes: float, clock: Callable[[], float] = time.monotonic):
        self.minutes, self.clock = minutes, clock
        self.last_written = clock()

    def due(self) -> bool:
        return self.clock() - self.last_written >= 60 * self.minutes

    def written(self) -> None:
        self.last_written = self.clock()


class StopRequest:
    """The first SIGINT (Ctrl-C) or SIGTERM (a scheduler's preemption) during training asks for a
    clean stop: the epoch under way finishes, its checkpoint is written and train.py exits with
    128 + the signal's number; a second Ctrl-C interrupts at once, as without this."""

    def __init__(self) -> None:
        self.signal_number: int | None = None
        self.previous_handlers: dict[int, object] = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():  # Python runs handlers in the main thread only
            self.previous_handlers = {number: signal.signal(number, self.handle) for number in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exception: object) -> None:
        for number, handler in self.previous_handlers.items():
            signal.signal(number, handler)

    def handle(self, number: int, frame: object) -> None:
        if self.signal_number is not None and number == signal.SIGINT:
            raise KeyboardInterrupt
        self.signal_number = number
        print(
            f"\n{signal.Signals(number).name}: stopping after this epoch's checkpoint (Ctrl-C again stops now)", file=sys.stderr
        )

    def agreed(self, runtime: Runtime) -> bool:
        """Whether any rank was asked to stop; every rank asks after every epoch, so all stop together."""
        asked = torch.tensor(float(self.signal_number is not None), device=runtime.device)
        return bool(runtime.mean_across_ranks(asked) > 0)


class TrainingStopped(Exception):
    """A clean stop: the checkpoint of the last finished epoch is on disk."""

    def __init__(self, message: str, signal_number: int):
        super().__init__(message)
        self.signal_number = signal_number


def write_history(run_dir: Path, vae_history: list[dict], unet_history: list[dict]) -> None:
    """history.jsonl: one line per epoch of each stage, rewritten whole from the checkpoints."""
    lines = [json.dumps(entry) for entry in vae_history + unet_history]
    write_text_atomic(run_dir / "history.jsonl", "\n".join(lines) + "\n")


def plot_history(history: list[dict], path: Path, title: str) -> None:
    """Training loss of every epoch; validation loss of the validated ones (run.validate_every)."""
    validated = [entry for entry in history if "val_loss" in entry]
    plot_curves(
        {
            "train": ([entry["epoch"] for entry in history], [entry["train_loss"] for entry in history]),
            "validation": ([entry["epoch"] for entry in validated], [entry["val_loss"] for entry in validated]),
        },
        path,
        title,
    )
