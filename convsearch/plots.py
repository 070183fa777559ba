"""The charts a person looks at: mean search score per layer for each model, and a projection
scatter coloured by label. Written as PNG files (matplotlib, no display needed)."""

import collections
import pathlib

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - after choosing the backend


def scores_per_layer(scores, path: pathlib.Path, title: str) -> None:
    """One line per model and metric: mean search score at each of its layers, in graph order."""
    lines = collections.defaultdict(list)
    for score in scores:
        lines[score.model, score.metric].append(score)
    figure, axes = plt.subplots(figsize=(10, 5.5))
    for (model, metric), points in sorted(lines.items()):
        points.sort(key=lambda s: s.parameter_count)  # graph order: the model cut there grows
        axes.plot(range(1, len(points) + 1), [s.mean_score for s in points], marker="o", label=f"{model} ({metric})")
        best = max(points, key=lambda s: s.mean_score)
        axes.annotate(best.layer, (points.index(best) + 1, best.mean_score), textcoords="offset points",
                      xytext=(0, 6), ha="center", fontsize=7)
    if len(lines) == 1:
        axes.set_xticks(range(1, len(points) + 1), [s.layer for s in points], rotation=30, ha="right", fontsize=8)
    axes.set_xlabel("layer (first conv ... last conv)")
    axes.set_ylabel("mean search score (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def projection(points, path: pathlib.Path, title: str) -> None:
    """A scatter of the projected points, one colour per label."""
    figure, axes = plt.subplots(figsize=(7.5, 6.5))
    by_label = collections.defaultdict(list)
    for x, y, label in zip(points.x, points.y, points.labels, strict=True):
        by_label[label or "(unlabeled)"].append((x, y))
    colours = plt.get_cmap("tab10" if len(by_label) <= 10 else "tab20")
    for number, (label, coordinates) in enumerate(sorted(by_label.items())):
        xs, ys = zip(*coordinates, strict=True)
        axes.scatter(xs, ys, s=14, color=colours(number % colours.N), label=label, alpha=0.85)
    axes.set_title(title)
    axes.set_xticks([])
    axes.set_yticks([])
    axes.legend(fontsize=8, markerscale=1.5, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
