"""What the comparisons share: the run's context, the result rows, interleaved rounds, the
two epoch-time data sets, quiet output, and a scratch copy of the project."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Rounds, at least, of a comparison of runs that take about 2 s (a digits fit), whatever
# --reps says: on 2 shared cores one such round's ratio ranges over 0.85-1.45x, so the median
# of five moved by up to 0.1x from one benchmark run to the next.
SHORT_RUN_ROUNDS = 15


@dataclass
class Context:
    """One benchmark run: a scratch folder, the number of rounds per comparison, what is
    built once and shared (data sets, the scratch pipeline), and extra report sections."""

    scratch: Path
    reps: int = 5
    accelerator: str = "cpu"  # where the training comparisons train (--accelerator)
    cache: dict = field(default_factory=dict)
    report: dict = field(default_factory=dict)

    def once(self, key: str, make: Callable[[], object]):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]


def result(metric, ours, reference, ratio, goal, passed, unit="", **extra) -> dict:
    """One row of the table (and of reports/bench.json)."""
    return {
        "metric": metric,
        "ours": ours,
        "reference": reference,
        "ratio": ratio,
        "goal": goal,
        "pass": bool(passed),
        "unit": unit,
        **extra,
    }


def interleaved(ours: Callable[[], float], reference: Callable[[], float], rounds: int):
    """``rounds`` measurements of each side, alternating which side goes first, so that a
    machine that speeds up or slows down affects both alike. Returns (ours, reference)."""
    o, r = [], []
    for i in range(rounds):
        if i % 2:
            r.append(reference())
            o.append(ours())
        else:
            o.append(ours())
            r.append(reference())
    return o, r


def ratio_row(metric, ours, reference, max_ratio, unit="s", scale=1.0, **extra) -> dict:
    """A time comparison: the medians of both sides and the median of the rounds' ratios
    (ours / reference: below 1 is faster), passing when it is at most ``max_ratio``; with
    ``max_ratio=None`` the row is for information only."""
    ratios = [o / r for o, r in zip(ours, reference, strict=True)]
    ratio = statistics.median(ratios)
    return result(
        metric,
        round(statistics.median(ours) * scale, 4),
        round(statistics.median(reference) * scale, 4),
        round(ratio, 3),
        "—" if max_ratio is None else f"<= {max_ratio:.2f}x",
        max_ratio is None or ratio <= max_ratio,
        unit,
        round_ratios=[round(x, 3) for x in ratios],
        informational=max_ratio is None,
    )


@contextlib.contextmanager
def quiet():
    """Swallow what training prints (one line per epoch)."""
    with contextlib.redirect_stdout(io.StringIO()):
        yield


# --- data -----------------------------------------------------------------------------------


def digits_prepared():
    """The digits, cleaned and split exactly as the pipeline does, in memory."""
    from pipeline.config import SplitParams
    from pipeline.data import digits
    from pipeline.data.loader import Prepared, to_tensors
    from pipeline.data.table import Manifest
    from pipeline.validation.split import assign_splits

    loaded = digits.load()
    table = loaded.pop("table")
    splits = assign_splits(table["sample_id"], SplitParams())
    tables = {s: table[splits == s].reset_index(drop=True) for s in ("train", "val", "test")}
    manifest = Manifest("digits", len(table), "sha256:bench", **loaded)
    tensors = {s: to_tensors(t, manifest.image_shape) for s, t in tables.items()}
    return Prepared(manifest, tables, tensors)


def mnist_sized(train: int = 60_000, val: int = 10_000, seed: int = 0):
    """A made-up set the size and shape of MNIST: ``train`` + ``val`` grey 1×28×28 uint8
    images in 10 classes. Each class is a fixed random blob pattern; an image is its class's
    pattern at a random brightness plus noise, so a network learns it (the loss falls and the
    best weights change) without any download. Same seed, same images."""
    import pandas as pd
    import torch

    from pipeline.data.loader import Prepared
    from pipeline.data.table import Manifest

    g = torch.Generator().manual_seed(seed)
    blobs = torch.rand(10, 1, 7, 7, generator=g)
    patterns = torch.nn.functional.interpolate(blobs, size=(28, 28), mode="bilinear")
    tensors = {}
    for split, n in (("train", train), ("val", val)):
        y = torch.randint(0, 10, (n,), generator=g)
        x = torch.empty(n, 1, 28, 28, dtype=torch.uint8)
        for start in range(0, n, 10_000):  # in chunks: float32 copies of all would take 1 GB
            part = y[start : start + 10_000]
            level = torch.rand(len(part), 1, 1, 1, generator=g) * 0.6 + 0.4
            noise = torch.randn(len(part), 1, 28, 28, generator=g) * 0.25
            image = (patterns[part] * level + noise) * 255
            x[start : start + 10_000] = image.clamp(0, 255).to(torch.uint8)
        tensors[split] = (x, y)
    tables = {s: pd.DataFrame({"label": y.numpy()}) for s, (_, y) in tensors.items()}
    manifest = Manifest(
        "mnist-sized", train + val, "sha256:bench", list(range(10)), [1, 28, 28], [0.0, 255.0]
    )
    return Prepared(manifest, tables, tensors)


# --- child processes and the scratch project ------------------------------------------------


def child_env(**extra: str) -> dict:
    """This environment without MLflow settings (children log to their own store), with this
    interpreter's folder first on PATH (``dvc`` from the same virtualenv)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return {**env, **extra}


# Seconds a child process of a stopped bench gets to end after SIGTERM, before SIGKILL.
STOP_GRACE_S = 30


@contextlib.contextmanager
def stopped_with(child: subprocess.Popen, stop: int):
    """A block that waits for ``child``: if the bench is stopped meanwhile (SIGTERM, ^C), the
    child is sent ``stop`` and gets :data:`STOP_GRACE_S` seconds to end; one still running
    after that, or after a second stop, is killed."""
    try:
        yield
    except BaseException:
        end_child(child, stop, STOP_GRACE_S)
        raise
    finally:
        if child.poll() is None:  # a second stop came while it was ending
            child.kill()
            child.wait()


def end_child(child: subprocess.Popen, stop: int, grace: float) -> None:
    """Send ``child`` ``stop``, give it ``grace`` seconds to end, then kill it."""
    child.send_signal(stop)
    with contextlib.suppress(subprocess.TimeoutExpired):
        child.wait(timeout=grace)
    if child.poll() is None:
        child.kill()
        child.wait()


def timed(cmd: list[str], cwd: Path, **env: str) -> tuple[float, str]:
    """Wall seconds of one child process and what it printed; a failure raises with its
    output's tail. Stopped while it waits (SIGTERM, ^C), it sends the child SIGTERM and waits
    up to :data:`STOP_GRACE_S` for it to end (then SIGKILL)."""
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out:
        child = subprocess.Popen(
            cmd, cwd=cwd, env=child_env(**env), stdout=out, stderr=subprocess.STDOUT
        )
        with stopped_with(child, signal.SIGTERM):  # on which a stage stops its workers and runs
            code = child.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}:\n{text[-3000:]}")
    return wall, text


def project_copy(dest: Path) -> Path:
    """This checkout's files as they are now, uncommitted changes included (what git tracks or
    would add; no outputs, no virtualenv), committed in a new git repository at ``dest``."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.decode()
    for name in filter(None, names.split("\0")):
        if (ROOT / name).is_file():  # not deleted in the working tree
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, dest / name)
    git = ["git", "-c", "user.name=bench", "-c", "user.email=bench@localhost"]
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "benchmark copy"]):
        subprocess.run([*git, *args], cwd=dest, check=True, capture_output=True)
    return dest
