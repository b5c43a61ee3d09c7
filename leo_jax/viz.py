"""Pictures of what a model does, for notebooks and reports: training curves from a workdir's metrics.jsonl, CoTR
attention maps laid over the image, MMoE routing heat maps, LEO's tiles.

Needs matplotlib, an optional dependency: `pip install "leo_jax[notebooks]"`. The array helpers (`read_metrics`,
`attention_heatmap`, `overlay`) are pure numpy; the `plot_*` functions draw into given axes or a new figure and
return the figure.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence

import numpy as np

try:
    import matplotlib.pyplot as plt
except ImportError as error:  # pragma: no cover - depends on the environment
    raise ImportError("leo_jax.viz needs matplotlib: pip install 'leo_jax[notebooks]' (or pip install matplotlib)"
                      ) from error


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a training run's metrics.jsonl (`path`: the file or the workdir holding it), in file order."""
    path = os.fspath(path)
    if os.path.isdir(path):
        path = os.path.join(path, "metrics.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no metrics.jsonl; give a training workdir (python -m leo_jax.train "
                                "--workdir DIR) or the metrics.jsonl file itself")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise ValueError(f"{path}:{number}: not a JSON record ({error})") from error
    return records


def series(records: Sequence[Mapping], key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of every record that has `key`."""
    rows = [(r["step"], r[key]) for r in records if key in r]
    steps, values = zip(*rows) if rows else ((), ())
    return np.asarray(steps), np.asarray(values, dtype=np.float64)


def accuracy_by_type(records: Sequence[Mapping]) -> dict[str, tuple[float, float]]:
    """{question type: (exact-match accuracy, majority-answer chance)} from the last evaluation record."""
    evals = [r for r in records if any(k.endswith("/accuracy") for k in r)]
    if not evals:
        return {}
    last = evals[-1]
    return {k.split("/")[1]: (float(v), float(last.get(k.replace("/accuracy", "/majority_accuracy"), np.nan)))
            for k, v in last.items() if k.startswith("eval/") and k.endswith("/accuracy")}


def _axes(ax, ncols: int = 1, size=(5, 3.2)):
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(1, ncols, figsize=(size[0] * ncols, size[1]), squeeze=True)
    return fig, ax


def plot_training_curves(records: Sequence[Mapping] | str | os.PathLike, keys: Sequence[str] = ("loss",)):
    """Training loss (and any other logged `keys`) over steps, next to the per-type accuracy of the last evaluation
    with its chance level. `records`: read_metrics output or a workdir."""
    if not isinstance(records, (list, tuple)):
        records = read_metrics(records)
    accuracy = accuracy_by_type(records)
    fig, axes = plt.subplots(1, 2 if accuracy else 1, figsize=(10 if accuracy else 5, 3.2), squeeze=False)
    ax = axes[0, 0]
    for key in keys:
        steps, values = series(records, key)
        if not len(steps):
            raise KeyError(f"no record of the training metrics has {key!r}; logged keys: "
                           f"{sorted({k for r in records for k in r})}")
        ax.plot(steps, values, marker=".", label=key)
    ax.set_xlabel("step")
    ax.set_title("training")
    ax.legend()
    if accuracy:
        ax = axes[0, 1]
        names = sorted(accuracy)
        x = np.arange(len(names))
        ax.bar(x, [accuracy[n][0] for n in names], color="tab:blue", label="exact match")
        ax.scatter(x, [accuracy[n][1] for n in names], color="black", marker="_", s=400, label="chance (majority)")
        ax.set_xticks(x, names)
        ax.set_ylim(0, 1)
        ax.set_title("accuracy per question type (last eval)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def attention_heatmap(weights: np.ndarray, grid: tuple[int, int] | None = None) -> np.ndarray:
    """A query's weights over an expert's N tokens [N] (row-major token grid) -> [rows, cols]; square unless
    `grid` is given."""
    weights = np.asarray(weights, dtype=np.float64)
    if weights.ndim != 1:
        raise ValueError(f"attention_heatmap takes one query's weights [N], got shape {weights.shape}")
    if grid is None:
        side = math.isqrt(weights.size)
        if side * side != weights.size:
            raise ValueError(f"{weights.size} tokens are not a square grid; pass grid=(rows, cols)")
        grid = (side, side)
    if grid[0] * grid[1] != weights.size:
        raise ValueError(f"grid {grid} does not hold {weights.size} tokens")
    return weights.reshape(grid)


def overlay(image: np.ndarray, heatmap: np.ndarray, alpha: float = 0.6, cmap: str = "inferno") -> np.ndarray:
    """The image (uint8 or float in [0, 1], [H, W, 3]) blended with a heat map stretched to its size (each token
    cell covers its block of pixels; the map is scaled to [0, 1] by its maximum). Returns float [H, W, 3]."""
    image = np.asarray(image)
    image = image.astype(np.float64) / 255.0 if image.dtype == np.uint8 else image.astype(np.float64)
    h, w = image.shape[:2]
    rows, cols = heatmap.shape
    r = (np.arange(h) * rows) // h
    c = (np.arange(w) * cols) // w
    big = np.asarray(heatmap, np.float64)[r[:, None], c[None, :]]
    big = big / max(big.max(), 1e-12)
    colour = plt.get_cmap(cmap)(big)[..., :3]
    return (1 - alpha) * image[..., :3] + alpha * colour


def plot_attention_maps(image: np.ndarray, weights: np.ndarray, queries: Sequence[int] | None = None,
                        title: str = "", ncols: int = 8, alpha: float = 0.6):
    """One panel per CoTR query: its attention weights [N^V, N] over the expert's token grid, laid over the image."""
    weights = np.asarray(weights)
    queries = list(range(weights.shape[0])) if queries is None else list(queries)
    ncols = min(ncols, len(queries))
    nrows = math.ceil(len(queries) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.4 * ncols, 1.4 * nrows + (0.4 if title else 0)),
                             squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, q in zip(axes.flat, queries):
        ax.imshow(overlay(image, attention_heatmap(weights[q]), alpha))
        ax.set_title(f"q{q} max {weights[q].max():.2f}", fontsize=7)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig


def plot_routing(load: Mapping[str, np.ndarray] | np.ndarray, title: str = "MMoE expert load"):
    """Heat maps of the routed experts' load (fraction of tokens whose top-1 choice is each expert) per layer:
    `load` [L, E] or {question type: [L, E]} (one panel per type, same colour scale)."""
    panels = load if isinstance(load, Mapping) else {"": load}
    panels = {k: np.asarray(v, np.float64) for k, v in panels.items()}
    for name, value in panels.items():
        if value.ndim != 2:
            raise ValueError(f"routing load {name!r} must be [layers, experts], got shape {value.shape}")
    fig, axes = plt.subplots(1, len(panels), figsize=(1.5 + 1.9 * len(panels), 2.9), squeeze=False)
    for index, (ax, (name, value)) in enumerate(zip(axes[0], panels.items())):
        image = ax.imshow(value, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for (layer, expert), v in np.ndenumerate(value):
            ax.text(expert, layer, f"{v:.2f}", ha="center", va="center", fontsize=7,
                    color="white" if v < 0.6 else "black")
        ax.set_xticks(range(value.shape[1]))
        ax.set_yticks(range(value.shape[0]))
        ax.set_xlabel("expert")
        if index == 0:
            ax.set_ylabel("layer")
        ax.set_title(name, fontsize=9)
    fig.colorbar(image, ax=list(axes[0]), shrink=0.8)
    fig.suptitle(title, fontsize=10, y=1.02)
    return fig


def plot_tiles(image: np.ndarray, tiles: Sequence[np.ndarray], grid: tuple[int, int], title: str = ""):
    """LEO's adaptive tiling of one image: the original with the chosen (cols x rows) grid drawn on it, then each
    tile in crop order (the thumbnail, when present, last)."""
    cols, rows = grid
    n = len(tiles)
    fig, axes = plt.subplots(1, n + 1, figsize=(2.2 * (n + 1), 2.4), squeeze=False)
    ax = axes[0, 0]
    ax.imshow(image)
    h, w = np.asarray(image).shape[:2]
    for i in range(1, cols):
        ax.axvline(i * w / cols, color="yellow", lw=1.5)
    for j in range(1, rows):
        ax.axhline(j * h / rows, color="yellow", lw=1.5)
    ax.set_title(f"{w}x{h} -> {cols}x{rows}", fontsize=8)
    for k, (ax, tile) in enumerate(zip(axes[0, 1:], tiles)):
        ax.imshow(tile)
        ax.set_title("thumbnail" if n > 1 and k == n - 1 else f"tile {k}", fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    return fig
