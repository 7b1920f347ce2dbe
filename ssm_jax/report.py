"""Visual evaluation report: overlays, a sample grid, ROC/PRO curves, an index page.

matplotlib (Agg back end) is imported inside the functions so that importing this module
stays cheap and works without a display.
"""

from __future__ import annotations

import html
import json
import os
import re

import numpy as np


def _jet(x: np.ndarray) -> np.ndarray:
    """Jet colour map of values in [0, 1] -> [..., 3] in [0, 1] (vectorized)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    centres = np.array([0.75, 0.5, 0.25])  # red, green, blue
    return np.clip(1.5 - np.abs(4.0 * (x - centres)), 0.0, 1.0)


def overlay(image: np.ndarray, amap: np.ndarray, vmin: float, vmax: float,
            alpha: float = 0.5) -> np.ndarray:
    """Heat map blended over an image [S, S, C] in [0, 1]; returns uint8 [S, S, 3]."""
    img = np.asarray(image, np.float32)
    if img.ndim == 2:
        img = img[..., None]
    if img.shape[-1] == 1:
        img = np.repeat(img, 3, axis=-1)
    norm = (np.asarray(amap, np.float32) - vmin) / max(vmax - vmin, 1e-12)
    out = (1.0 - alpha) * img + alpha * _jet(norm)
    return (np.clip(out, 0, 1) * 255).round().astype(np.uint8)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_") or "image"


def save_overlays(out_dir: str, images: np.ndarray, maps: np.ndarray, names: list[str],
                  vmin: float, vmax: float) -> list[str]:
    """Writes ``<name>_overlay.png`` per image; returns the paths."""
    from PIL import Image

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for img, amap, name in zip(images, maps, names):
        p = os.path.join(out_dir, f"{_safe(name)}_overlay.png")
        Image.fromarray(overlay(img, amap, vmin, vmax)).save(p)
        paths.append(p)
    return paths


def _sample(labels: np.ndarray, scores: np.ndarray, k: int) -> np.ndarray:
    """Highest-scoring anomalies and highest-scoring normals (the hardest), k in all."""
    bad = np.nonzero(labels == 1)[0]
    good = np.nonzero(labels == 0)[0]
    bad = bad[np.argsort(-scores[bad])]
    good = good[np.argsort(-scores[good])]
    nb = min(len(bad), max(k - min(len(good), k // 2), 0))
    ng = min(len(good), k - nb)
    return np.r_[bad[:nb], good[:ng]].astype(int)


def write_report(eval_dir: str, test_set, out: dict, result: dict, threshold: float | None,
                 num_overlays: int) -> str:
    """Writes overlays, grid.png, roc.png, pro.png, scores_hist.png, index.md/.html."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ssm_jax import metrics as metrics_lib

    os.makedirs(eval_dir, exist_ok=True)
    maps, scores = np.asarray(out["map"]), np.asarray(out["score"])
    labels = np.asarray(test_set.labels)
    vmin, vmax = float(maps.min()), float(maps.max())
    pix_thr = threshold if threshold is not None else float(
        np.quantile(maps[labels == 0], 0.99) if (labels == 0).any() else maps.max())
    figures: list[tuple[str, str]] = []
    idx = _sample(labels, scores, num_overlays)
    names = [f"{test_set.defect_types[i]}_"
             f"{os.path.splitext(os.path.basename(test_set.paths[i]))[0]}" for i in idx]
    overlays = save_overlays(eval_dir, test_set.images[idx], maps[idx], names, vmin, vmax)

    if len(idx):
        cols = ["input", "restored", "ground truth", "anomaly map", "thresholded"]
        fig, axes = plt.subplots(len(idx), 5, figsize=(10, 2.1 * len(idx)), squeeze=False)
        for r, i in enumerate(idx):
            img = test_set.images[i]
            grey = img[..., 0] if img.shape[-1] == 1 else img
            rest = np.asarray(out["restored"][i])
            rest = rest[..., 0] if rest.shape[-1] == 1 else rest
            gt = test_set.masks[i] if test_set.masks is not None else np.zeros(maps[i].shape)
            panels = [grey, rest, gt, overlay(img, maps[i], vmin, vmax), maps[i] > pix_thr]
            for c, p in enumerate(panels):
                ax = axes[r, c]
                ax.imshow(p, cmap="gray" if np.ndim(p) == 2 else None, vmin=0, vmax=1)
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title(cols[c], fontsize=8)
            axes[r, 0].set_ylabel(f"{test_set.defect_types[i]}\n{scores[i]:.3f}", fontsize=7)
        fig.tight_layout()
        fig.savefig(os.path.join(eval_dir, "grid.png"), dpi=80)
        plt.close(fig)
        figures.append(("Samples (hardest anomalies and normals)", "grid.png"))

    if (labels == 1).any() and (labels == 0).any():
        fig, ax = plt.subplots(figsize=(4, 4))
        fpr, tpr, _ = metrics_lib.roc_curve(labels, scores)
        ax.plot(fpr, tpr, label=f"image AUROC {result.get('image_auroc') or 0:.3f}")
        if test_set.masks is not None:
            sub = slice(None, None, max(1, maps.size // 2_000_000))
            fpr, tpr, _ = metrics_lib.roc_curve(test_set.masks.reshape(-1)[sub] > 0.5,
                                                maps.reshape(-1)[sub])
            ax.plot(fpr, tpr, label=f"pixel AUROC {result.get('pixel_auroc') or 0:.3f}")
        ax.plot([0, 1], [0, 1], "k:", lw=0.5)
        ax.set_xlabel("false positive rate")
        ax.set_ylabel("true positive rate")
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        fig.savefig(os.path.join(eval_dir, "roc.png"), dpi=80)
        plt.close(fig)
        figures.append(("ROC", "roc.png"))
        if test_set.masks is not None and test_set.masks.any():
            fpr, pro = metrics_lib.pro_curve(test_set.masks > 0.5, maps)
            keep = fpr <= 0.3
            fig, ax = plt.subplots(figsize=(4, 4))
            ax.plot(fpr[keep], pro[keep], label=f"AUPRO {result.get('aupro') or 0:.3f}")
            ax.set_xlabel("false positive rate")
            ax.set_ylabel("per-region overlap")
            ax.set_xlim(0, 0.3)
            ax.legend(loc="lower right", fontsize=8)
            fig.tight_layout()
            fig.savefig(os.path.join(eval_dir, "pro.png"), dpi=80)
            plt.close(fig)
            figures.append(("PRO (FPR <= 0.3)", "pro.png"))

    fig, ax = plt.subplots(figsize=(5, 3))
    for lab, name in ((0, "normal"), (1, "anomalous")):
        if (labels == lab).any():
            ax.hist(scores[labels == lab], bins=30, alpha=0.6, label=name)
    if threshold is not None:
        ax.axvline(threshold, color="k", ls="--", label="threshold")
    ax.set_xlabel("image score")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(os.path.join(eval_dir, "scores_hist.png"), dpi=80)
    plt.close(fig)
    figures.append(("Image scores", "scores_hist.png"))

    rows = "".join(f"<tr><td>{html.escape(str(k))}</td><td>{html.escape(json.dumps(v))}</td>"
                   f"</tr>" for k, v in result.items())
    body = "".join(f"<h2>{html.escape(t)}</h2><img src='{f}'>" for t, f in figures)
    ovl = "".join(f"<img src='{os.path.basename(p)}' width=160 title='{os.path.basename(p)}'>"
                  for p in overlays)
    page = (f"<html><head><meta charset='utf-8'><title>ssm_jax evaluation</title></head>"
            f"<body><h1>Evaluation</h1><table border=1>{rows}</table>{body}"
            f"<h2>Overlays</h2>{ovl}</body></html>")
    with open(os.path.join(eval_dir, "index.html"), "w") as f:
        f.write(page)
    md = ["# Evaluation", "", "| metric | value |", "|---|---|"]
    md += [f"| {k} | {json.dumps(v)} |" for k, v in result.items()]
    md += [f"\n## {t}\n\n![{t}]({f})" for t, f in figures]
    md += ["\n## Overlays\n"] + [f"![]({os.path.basename(p)})" for p in overlays]
    with open(os.path.join(eval_dir, "index.md"), "w") as f:
        f.write("\n".join(md) + "\n")
    return os.path.join(eval_dir, "index.html")
