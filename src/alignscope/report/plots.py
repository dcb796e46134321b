"""Figures for reports (matplotlib, headless Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import numpy as np  # noqa: E402


def spectrum_plot(
    path: Path, eigenvalues: Sequence[float], d: int, trace: float, title: str = ""
) -> Path:
    """Eigenvalues (log scale) with the chosen rank ``d`` marked, and the explained fraction."""
    vals = np.asarray(eigenvalues, dtype=float)
    idx = np.arange(1, vals.size + 1)
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    ax.semilogy(idx, np.clip(vals, 1e-300, None), "o-", ms=3, label="eigenvalue")
    ax.axvline(d, color="C3", ls="--", label=f"d = {d}")
    ax.set_xlabel("index j")
    ax.set_ylabel("lambda_j of the alignment Fisher")
    twin = ax.twinx()
    twin.plot(idx, np.cumsum(vals) / trace, color="C2", lw=1, label="explained fraction")
    twin.set_ylim(0, 1.05)
    twin.set_ylabel("cumulative fraction of tr F")
    lines = ax.get_legend_handles_labels()
    lines2 = twin.get_legend_handles_labels()
    ax.legend(lines[0] + lines2[0], lines[1] + lines2[1], loc="center right", fontsize=8)
    ax.set_title(title or "Alignment Fisher spectrum")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def forecast_plot(
    path: Path,
    steps: Sequence[float],
    total: Sequence[float],
    terms: Mapping[str, Sequence[float]],
    horizon: float | None,
    threshold: float | None,
    observed: tuple[Sequence[float], Sequence[float]] | None = None,
    title: str = "",
) -> Path:
    """The forecast dL_a over steps, linear and log-log, with each term and the horizon marked.

    A forecast of a single step (validity horizon 1) is a point, not a line: it is drawn as a
    large marker, and its legend entry and a note on each panel say that it ends at that step.
    """
    k = np.asarray(steps, dtype=float)
    single = k.size == 1
    label, note = "forecast dL_a", ""
    if single:
        at_horizon = horizon is not None and k[0] >= horizon
        note = f"forecast ends at step {k[0]:g}" + (" (validity horizon)" if at_horizon else "")
        label += f" (ends at step {k[0]:g}" + (": validity horizon)" if at_horizon else ")")
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.0))
    for ax, loglog in zip(axes, (False, True), strict=True):
        # markers too: a short validity window holds few points, a one-step window a single one
        ax.plot(k, total, color="k", lw=2, marker="D" if single else ".", ms=7 if single else 4,
                label=label)  # fmt: skip
        for i, (name, values) in enumerate(terms.items()):
            v = np.asarray(values, dtype=float)
            if loglog:
                v = np.abs(v)
            ax.plot(k, v, lw=1, ls="--", color=f"C{i}", label=name,
                    marker="x" if single else None)  # fmt: skip
        if single:
            ax.text(0.02, 0.97, note,
                    transform=ax.transAxes, va="top", fontsize=8, color="k")  # fmt: skip
        if observed is not None:
            ax.plot(observed[0], observed[1], "o", ms=4, color="C3", label="observed")
        if horizon is not None:
            ax.axvline(horizon, color="grey", ls=":", label="validity horizon")
        shown = list(total) + (list(observed[1]) if observed is not None else [])
        shown = np.asarray([np.nan if v is None else v for v in shown], dtype=float)
        peak = float(np.nanmax(shown)) if np.isfinite(shown).any() else float("nan")
        if threshold is not None and (loglog or not peak < threshold / 10):
            ax.axhline(threshold, color="C3", lw=0.8, ls="-.", label="threshold")
        elif threshold is not None:  # drawn to scale it would flatten the curve to zero
            ax.set_title(f"linear (threshold {threshold:g} is off the scale)")
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("alignment loss increase dL_a")
        if loglog:
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_title("log-log")
        elif not ax.get_title():
            ax.set_title("linear")
    axes[0].legend(fontsize=7)
    fig.suptitle(title or "Alignment-loss forecast")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def series_plot(
    path: Path,
    steps: Sequence[float],
    series: Mapping[str, Sequence[float | None]],
    ylabel: str,
    title: str,
    hline: float | None = None,
    hline_label: str = "",
    ylim: tuple[float, float] | None = None,
    vline: float | None = None,
    vline_label: str = "",
) -> Path:
    """Measured quantities over optimizer steps (``None`` entries are skipped, and the line joins
    the measured points around them)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0))
    for i, (name, values) in enumerate(series.items()):
        pts = [(s, x) for s, x in zip(steps, values, strict=True) if x is not None]
        ax.plot([s for s, _ in pts], [x for _, x in pts], "o-", ms=3, color=f"C{i}", label=name)
    if hline is not None:
        ax.axhline(hline, color="grey", ls="--", lw=0.8, label=hline_label or None)
    if vline is not None:
        ax.axvline(vline, color="C3", ls=":", lw=1.0, label=vline_label or None)
    if ylim is not None:
        ax.set_ylim(*ylim)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
