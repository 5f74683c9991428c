"""Figures of causal traces and of the speed benchmark as PNG files (needs matplotlib:
``pip install memit-adapter[plot]``).

Usage::

    plot_trace(trace_fact(model, tok, "{} plays the sport of", "Michael Jordan"), "hidden.png")  # Figure 8
    plot_traces([hidden, mlp, attn], "traces.png")      # the three kinds side by side
    plot_severed(trace_severed(model, tok, requests), "severed.png")                        # Figure 3
    plot_frontier(run_comparison("world-gpt2-bpe", frontier=[10, 20, 40]), "frontier.png")  # Score vs seconds

Each function returns the matplotlib ``Figure`` and writes ``path`` when given. No pyplot: figures are
rendered by the Agg backend and never shown, so this works on headless machines and in threads.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .tracing import SeveredTrace, TraceResult

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

_CMAPS = {"hidden": "Purples", "mlp": "Greens", "attn": "Reds"}
_STATE = {"hidden": "hidden-state", "mlp": "MLP", "attn": "attention"}
_COLORS = {"none": "#7b52ab", "attn": "#d1495b", "mlp": "#2a9d57"}
_LABELS = {"none": "effect of a single state", "attn": "with attention severed", "mlp": "with MLP severed"}


def require_matplotlib(command: str) -> None:
    """Exit with the install hint when matplotlib is missing: called by a command before its long work, whose
    figures come at the end."""
    import importlib.util

    if importlib.util.find_spec("matplotlib") is None:
        raise SystemExit(f'memit-adapter {command}: the figures need matplotlib: pip install "memit-adapter[plot]"')


def _figure(width: float, height: float) -> Figure:
    try:
        from matplotlib.figure import Figure
    except ImportError as e:  # optional extra
        raise ImportError("plots need matplotlib: pip install 'memit-adapter[plot]'") from e
    return Figure(figsize=(width, height), dpi=120, layout="constrained")


def _text(s: str) -> str:
    """Token or fact text safe for matplotlib (no mathtext), spaces visible at the ends."""
    return s.replace("$", r"\$").replace("\n", "\\n") if s.strip() else repr(s)


def _fact_title(result: TraceResult | SeveredTrace) -> str:
    if not result.target:
        return _text(result.text)
    return f"{_text(result.text)} \u2192 {_text(result.target.strip())}"


def _draw_trace(ax: Axes, result: TraceResult, fig: Figure) -> None:
    scores = result.scores.float().numpy()
    n_tok, n_layers = scores.shape
    mesh = ax.pcolormesh(scores, cmap=_CMAPS.get(result.kind, "Purples"), vmin=min(result.low, scores.min()),
                         edgecolors="white", linewidth=0.3)
    ax.invert_yaxis()
    s0, s1 = result.subject_range
    labels = [_text(t.strip() or t) + (" *" if s0 <= i < s1 else "") for i, t in enumerate(result.tokens)]
    ax.set_yticks([i + 0.5 for i in range(n_tok)], labels)
    step = max(1, n_layers // 12)
    ax.set_xticks([l + 0.5 for l in range(0, n_layers, step)], [str(l) for l in range(0, n_layers, step)])
    if result.kind == "hidden" or result.window == 1:
        ax.set_xlabel(f"restored {_STATE[result.kind]} layer")
    else:
        ax.set_xlabel(f"centre of {result.window} restored {_STATE[result.kind]} layers")
    ax.set_ylabel("token (* = subject)")
    kind = {"hidden": "hidden state", "mlp": "MLP output", "attn": "attention output"}[result.kind]
    ax.set_title(f"Restoring {kind} after corrupted subject\n{_fact_title(result)}\n"
                 f"p corrupted {result.low:.3g}, clean {result.high:.3g}", fontsize=9)
    bar = fig.colorbar(mesh, ax=ax)
    bar.ax.yaxis.get_major_formatter().set_useOffset(False)
    target = _text(result.target.strip()) if result.target else "object"
    bar.set_label(f"p({target}) with the state restored", fontsize=8)


def plot_trace(result: TraceResult, path: str | Path | None = None) -> Figure:
    """(token x layer) heatmap of one trace (Figure 8): darker = restoring that state recovers more."""
    n_tok, n_layers = result.scores.shape
    fig = _figure(max(4.5, 1.8 + 0.28 * n_layers + 0.08 * max(len(t) for t in result.tokens)),
                  max(2.8, 1.6 + 0.3 * n_tok))
    _draw_trace(fig.add_subplot(), result, fig)
    if path is not None:
        fig.savefig(path)
    return fig


def plot_traces(results: Sequence[TraceResult], path: str | Path | None = None) -> Figure:
    """Several traces of one fact side by side (e.g. hidden, MLP, attention: Figure 8 (a)-(c))."""
    n_tok, n_layers = results[0].scores.shape
    width = max(4.5, 1.8 + 0.28 * n_layers + 0.08 * max(len(t) for t in results[0].tokens))
    fig = _figure(width * len(results), max(2.8, 1.6 + 0.3 * n_tok))
    for i, result in enumerate(results):
        _draw_trace(fig.add_subplot(1, len(results), i + 1), result, fig)
    if path is not None:
        fig.savefig(path)
    return fig


def plot_severed(result: SeveredTrace, path: str | Path | None = None) -> Figure:
    """Per-layer bars of the indirect effect at the last subject token, with attention or MLP severed
    (Figure 3). The gap between the purple and green bars marks the layers whose MLPs matter."""
    modes = [m for m in ("none", "attn", "mlp") if m in result.scores]
    n_layers = len(result.scores["none"])
    fig = _figure(max(5.0, 1.5 + 0.35 * n_layers * len(modes) / 2), 3.4)
    ax = fig.add_subplot()
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        xs = [l + (i - (len(modes) - 1) / 2) * width for l in range(n_layers)]
        ax.bar(xs, result.effect(mode).float().numpy(), width=width, color=_COLORS[mode], label=_LABELS[mode])
    step = max(1, n_layers // 16)
    ax.set_xticks(list(range(0, n_layers, step)))
    ax.set_xlabel("layer of the restored hidden state (last subject token)")
    ax.set_ylabel("average indirect effect on p(object)")
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_title(f"Causal effect with attention or MLP severed\n{_fact_title(result)}", fontsize=9)
    ax.legend(fontsize=8, frameon=False)
    if path is not None:
        fig.savefig(path)
    return fig


_FAMILIES = {"b": ("(b) published settings", "#d1495b"), "c": ("(c) for_model", "#2a9d57")}


def plot_frontier(report: dict, path: str | Path | None = None) -> Figure:
    """Score and retention against seconds (statistics + edit) for the runs of a ``memit-adapter bench --compare`` on a
    world (:func:`~memit_adapter.bench.run_comparison`): one line per method through its runs at its own learning rate
    (labelled with their steps), triangles for its runs at F times it (labelled ``STEPSxF``), the defaults ringed, so
    that the methods compare at equal time or equal Score, not only at their defaults; with several seeds, each run's
    mean with ± one standard deviation."""
    runs = {name: run for name, run in report["runs"].items() if "score" in run}
    if not runs:
        raise ValueError("the report has no Scores: compare on a world, not on a random model")
    fig = _figure(9.0, 3.6)
    axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
    for family, (label, color) in _FAMILIES.items():
        names = sorted((n for n in runs if n[0] == family), key=lambda n: runs[n]["total_s"])
        if not names:
            continue
        default_lr = next((runs[n].get("v_lr") for n in names if "@" not in n), None)
        line = [n for n in names if runs[n].get("v_lr") == default_lr]  # the default learning rate, by steps
        scaled = [n for n in names if n not in line]  # xF points: markers off the line
        for ax, key in zip(axes, ("score", "retention")):
            ax.plot([runs[n]["total_s"] for n in line], [100 * runs[n][key] for n in line], "o-", color=color,
                    label=label)
            if scaled:
                ax.plot([runs[n]["total_s"] for n in scaled], [100 * runs[n][key] for n in scaled], "^",
                        color=color, label=f"{label}, F x its lr")
            for n in names:
                x = runs[n]["total_s"]
                text = n.split("@", 1)[1] if "@" in n else str(runs[n]["z_steps"])  # steps[xF]
                ax.annotate(text, (x, 100 * runs[n][key]), textcoords="offset points",
                            xytext=(4, 4), fontsize=7, color=color)
                if "@" not in n:  # the default
                    ax.plot([x], [100 * runs[n][key]], "o", markersize=11, markerfacecolor="none", color=color)
                if "sd" in runs[n]:  # several seeds: ± one standard deviation
                    ax.errorbar([x], [100 * runs[n][key]], yerr=[100 * runs[n]["sd"][key]], color=color,
                                capsize=3, linewidth=0.8)
    for ax, what in zip(axes, ("Score (harmonic mean of ES, PS, NS)", "retention of unedited facts")):
        ax.set_xlabel("seconds: statistics + edit")
        ax.set_ylabel(f"{what}, %")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, frameon=False, title="z steps (xF: F x lr); ringed: default", title_fontsize=7)
    from .bench import seeds_note

    fig.suptitle(f"{report['model']}, {report['n_requests']} edits, {report['threads']} threads{seeds_note(report)}",
                 fontsize=9)
    if path is not None:
        fig.savefig(path)
    return fig


__all__ = ["plot_frontier", "plot_severed", "plot_trace", "plot_traces"]
