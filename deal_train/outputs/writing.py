"""Writing results: atomic files and directories, predictions, the accuracy-matrix and average-accuracy plots.

Every file is written to a temporary name in the same directory and renamed into place, so a crash
or Ctrl-C never leaves a half-written ``metrics.json`` or adapter behind.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any, Callable, Sequence


METRICS_FILE = "metrics.json"
"""A run's results in its ``output_dir``: config, accuracy matrix, metrics, per-task figures."""


def atomic_write_text(path: str, text: str) -> None:
    """Write ``text`` to ``path`` via a temporary file and ``os.replace``."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the usual permissions
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_json(path: str, data: Any) -> None:
    """``atomic_write_text`` of ``json.dumps(data, indent=2)``."""
    atomic_write_text(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def atomic_write_dir(path: str, write: Callable[[str], None], keep_existing: bool = False) -> None:
    """Call ``write(tmpdir)`` and move the finished directory to ``path``, replacing an older one; with
    ``keep_existing`` an existing ``path`` wins instead (a cache that another process may have filled first).

    Raises:
        OSError: the rename failed (with ``keep_existing``: and no directory ``path`` exists).
    """
    parent = os.path.dirname(os.path.abspath(path))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)
        write(tmp)
        if keep_existing:
            try:
                os.rename(tmp, path)
            except OSError:
                if not os.path.isdir(path):
                    raise
        elif os.path.isdir(path):
            old = tempfile.mkdtemp(prefix=".old-", dir=parent)
            os.rename(path, os.path.join(old, "x"))
            os.rename(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_predictions(path: str, rows: list[dict]) -> None:
    """One JSON object per line: index, prediction, label, exact_match, rouge1."""
    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def format_pct(value: float | None, signed: bool = False) -> str:
    """A percentage with one decimal (``+`` sign when ``signed``); ``n/a`` for None."""
    if value is None:
        return "n/a"
    return f"{value:+.1f}" if signed else f"{value:.1f}"


def format_matrix(tasks: Sequence[str], matrix: Sequence[Sequence[float | None]]) -> str:
    """The accuracy matrix as a plain-text table (row = task, column = after training task t)."""
    width = max(len(t) for t in tasks) + 2
    head = " " * width + "".join(f"{'after ' + str(t + 1):>10}" for t in range(len(tasks)))
    lines = [head]
    for name, row in zip(tasks, matrix):
        cells = "".join(f"{'-' if v is None else f'{v:.1f}':>10}" for v in row)
        lines.append(f"{name:<{width}}{cells}")
    return "\n".join(lines)


def save_figure(fig, path: str, dpi: int = 120) -> None:
    """Save a matplotlib figure as a PNG atomically (a uniquely named temporary file in the same directory, then
    ``os.replace``), so parallel writers of the same path never clash, and close it."""
    import matplotlib.pyplot as plt

    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".png", dir=directory)
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=dpi, format="png")
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.remove(tmp)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def draw_accuracy_matrix(ax, tasks: Sequence[str], matrix: Sequence[Sequence[float | None]], title: str,
                         fontsize: int = 10):
    """Draw the accuracy matrix heat map on a matplotlib ``ax`` (row = evaluated task, column = after training task
    t; values in % on a fixed 0..100 colour scale, blank where not evaluated) and return the image (for a
    colorbar)."""
    import numpy as np

    n = len(tasks)
    data = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
    im = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=0, vmax=100)
    for i in range(n):
        for j in range(n):
            if not np.isnan(data[i, j]):
                ax.text(j, i, f"{data[i, j]:.1f}", ha="center", va="center",
                        color="white" if data[i, j] < 60 else "black", fontsize=fontsize)
    ax.set_xticks(range(n), [f"{j + 1}: {t}" for j, t in enumerate(tasks)], rotation=30, ha="right")
    ax.set_yticks(range(n), tasks)
    ax.set_xlabel("after training task")
    ax.set_ylabel("evaluated task")
    ax.set_title(title, fontsize=10)
    return im


def plot_accuracy_matrix(path: str, tasks: Sequence[str], matrix: Sequence[Sequence[float | None]],
                         title: str) -> None:
    """Save a heat map of the accuracy matrix (values in %, blank where not evaluated) as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = len(tasks)
    fig, ax = plt.subplots(figsize=(1.2 * n + 2.5, 1.0 * n + 1.8))
    im = draw_accuracy_matrix(ax, tasks, matrix, title)
    fig.colorbar(im, ax=ax, label="exact match (%)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_average_accuracy(path: str, tasks: Sequence[str], curves: dict[str, Sequence[float]], title: str) -> None:
    """Save a line plot (PNG) of each method's average accuracy over the tasks seen so far (in %), after
    each task; ``curves`` maps a method name to one value per task in training order."""
    n = len(tasks)

    def axes(ax) -> None:
        ax.set_xticks(range(1, n + 1), [f"{j + 1}: {t}" for j, t in enumerate(tasks)], rotation=30, ha="right")
        ax.set_xlim(0.7, n + 0.3)

    plot_lines(path, {name: list(zip(range(1, len(v) + 1), v)) for name, v in curves.items()},
               xlabel="after training task", ylabel="average accuracy of tasks seen (%)", title=title,
               width=max(5.0, 1.1 * n + 3.0), set_x_axis=axes)


def plot_lines(path: str, lines: dict[str, Sequence[tuple[float, float]]], xlabel: str, ylabel: str, title: str,
               width: float = 5.5, set_x_axis: Callable | None = None) -> None:
    """Save a line plot (PNG) of accuracies in % (y from 0 to 100): one line with markers per entry of ``lines``
    (name -> (x, y) points, drawn in the given order), a legend and a light grid; ``set_x_axis(ax)`` sets the
    x ticks and scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, 4.0))
    for name, points in lines.items():
        ax.plot([x for x, _ in points], [y for _, y in points], marker="o", label=name)
    if set_x_axis is not None:
        set_x_axis(ax)
    ax.set_ylim(0, 100)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
