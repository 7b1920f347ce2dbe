"""Evaluation of a trained run: threshold from the held-out normals (or the calibration
re-fitted on site by ``ssm-jax calibrate``, which stays in force), the test split scored,
metrics, the drift check of the test normals against the calibration normals,
``eval/metrics.json`` and the report. Scoring itself lives in
:mod:`ssm_jax.serving.detector` (which composes :mod:`ssm_jax.scoring.streamed`,
:mod:`ssm_jax.scoring.batch` and :mod:`ssm_jax.scoring.calibration`).

Sets of any size: of a folder, only the validation files of the training split are read
(``data.folder.validation_indices``), and the test split is read as it is scored, each host
its rows of every batch (:mod:`ssm_jax.scoring.streamed`). What is kept: the image scores
and each image's threshold (N floats each, gathered from every host; the thresholds differ
under ``eval.threshold_rule = conformal``, and every decision is against the image's own),
the pixel metrics' fixed-size accumulator (``ssm_jax.scoring.pixel_metrics``, summed over
hosts; where that module is missing, every map, and the exact computation), the
validation maps (for the threshold, the statistics and the pixel thresholds' range) and
the report's images: a fixed random sample of ``eval.report_images`` (kept while scoring
on one host) and the hardest cases, known only at the end and scored again then (a few
images; with several hosts the whole report set is, so that no maps cross hosts).
``per_image.csv`` has every image.

A killed ``evaluate`` does not resume: rerunning it costs what the killed run cost, its
result (metrics.json, the report) is written only at the end and atomically, so the
previous evaluation stays whole, and resuming would need the accumulator, the scores and
the report sample saved per batch for one command that is rarely interrupted (``predict``,
which scores sets without end, resumes).
"""

from __future__ import annotations

import logging
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from ssm_jax.core import storage
from ssm_jax.method import normalization
from ssm_jax.runs import rundir
from ssm_jax.serving.detector import Detector

log = logging.getLogger("ssm_jax")


def _report_sample(n: int, k: int, seed: int) -> np.ndarray:
    """The fixed random sample of the report: every image when ``n <= k``, else ``k`` of
    them, chosen before scoring (sorted indices)."""
    if n <= k:
        return np.arange(n)
    return np.sort(np.random.default_rng([seed, 43]).choice(n, k, replace=False))


def _pixel_accumulator(det: Detector, test) -> Any:
    """The pixel metrics' fixed-size accumulator (``ssm_jax.scoring.pixel_metrics``),
    thresholds from the calibration normals' maps; None where the exact computation on
    kept maps is the default (a set of few pixels: ``pixel_metrics.exact_is_cheap``), or
    without masks, calibration maps or that module."""
    if test.masks is None or det.calibration_maps is None or not len(det.calibration_maps):
        return None
    try:
        from ssm_jax.scoring import pixel_metrics
    except ImportError:
        return None
    shape = tuple(test.images.shape)  # (H, W) of a file source, [N, H, W, C] of an array
    hw = shape if len(shape) == 2 else shape[1:3]
    sizes = np.tile(np.asarray(hw, np.int64), (len(test), 1)) if test.sizes is None \
        else np.asarray(test.sizes, np.int64)
    pixels = int(np.prod(sizes, axis=1).sum())
    if pixel_metrics.exact_is_cheap(pixels):
        return None
    acc = pixel_metrics.PixelMetrics.from_normal_maps(det.calibration_maps,
                                                      det.calibration_sizes)
    log.info("pixel metrics of %d pixels accumulated at %d thresholds", pixels,
             acc.thresholds.size)
    return acc


def _curves_of(acc) -> tuple:
    """(pixel ROC, PRO) for the report's plots from the accumulator's kept points."""
    from ssm_jax.report import curves

    c = acc.curves()
    fps, tps, overlap = (np.asarray(c[k], np.float64) for k in ("fps", "tps", "overlap"))
    n_neg, n_pos = fps[-1], tps[-1]
    regions = int(acc.state["regions"])
    roc = curves.thin(fps / n_neg, tps / n_pos) if n_neg and n_pos else None
    pro = (curves.thin(fps / n_neg, overlap / regions, x_max=curves.PRO_FPR_LIMIT)
           if n_neg and regions else None)
    return roc, pro


def evaluate(cfg: ml_collections.ConfigDict, workdir: str,
             output_dir: str | None = None) -> dict:
    """Scores val (threshold) and test sets; writes ``workdir/eval/metrics.json`` + images,
    and the threshold and map statistics for later ``predict`` / ``Detector.load``.

    With ``output_dir``, metrics and report go there instead and the run directory is
    left as it is (no calibration files saved): a scoring variant of the run.
    """
    from ssm_jax.data import load_eval_sets
    from ssm_jax.report import drift as drift_report
    from ssm_jax.report import page as report
    from ssm_jax.scoring import calibration, drift, streamed
    from ssm_jax.scoring import metrics as metrics_lib

    det = Detector.from_config(cfg, workdir, read_calibration=False)
    val, test = load_eval_sets(cfg)  # sources: nothing decoded yet
    t0 = time.time()
    site, _ = calibration.load_record(workdir, cfg, det.step)
    if calibration.is_site(site):  # re-fitted on site (ssm-jax calibrate): in force
        det.threshold, det.stats = det.saved_calibration()
        log.info("threshold %.6g from the calibration of %s on %s (%s images)",
                 det.threshold, site["created"], site["source"], site.get("num_val_images"))
        if len(val) and test.masks is not None:  # the pixel thresholds' range only
            det.calibration_maps = det.score(val.images, val.sizes)["maps"]
    elif len(val):
        det.calibrate(val.images, val.sizes, "scoring validation", keep_maps=True)
    else:  # no threshold; settings that need validation images are refused here
        normalization.check_normalization(cfg.eval.map_normalization, 0)
    det.calibration_sizes = val.sizes
    threshold = det.threshold
    t1 = time.time()
    n = len(test)
    labels = np.asarray(test.labels)
    sample = _report_sample(n, int(cfg.eval.get("report_images", 200)), cfg.eval.seed)
    in_sample = np.zeros(n, bool)
    in_sample[sample] = True
    keep_all = jax.process_count() == 1  # else the report's images are scored again
    acc = _pixel_accumulator(det, test)
    exact = test.masks is not None and acc is None  # fallback: every map kept
    panels: dict[int, dict] = {}
    index, scores, own, all_maps, all_masks = [], [], [], [], []
    for b in det.score_batches(test.images, test.sizes, masks=test.masks,
                               restored=(lambda idx: in_sample[idx]) if keep_all else False,
                               progress="scoring test"):
        index.append(b.index)
        scores.append(b.score)
        if b.threshold is not None:
            own.append(b.threshold)
        if acc is not None:
            acc.update(b.map, b.mask, b.sizes)
        elif exact:
            all_maps.append(b.map)
            all_masks.append(b.mask)
        if keep_all:
            for r, i in enumerate(b.index):
                if in_sample[i]:  # copies: a view would keep its whole batch alive
                    panels[int(i)] = {"image": b.image[r].copy(), "map": b.map[r].copy(),
                                      "restored": None if b.restored is None
                                      else b.restored[r].copy()}
    index = np.concatenate(index) if index else np.zeros(0, np.int64)
    score = streamed.gather_rows(np.concatenate(scores) if scores else np.zeros(0, np.float32),
                                 index, n)
    # Each test image's own threshold (eval.threshold_rule = conformal; else every image's
    # is the one threshold), which decides it; the nominal one draws the report's lines.
    thresholds = None
    if threshold is not None:
        thresholds = streamed.gather_rows(
            np.concatenate(own) if own else np.full(len(index), threshold, np.float64),
            index, n)
    per_image = det.conformal is not None
    test_seconds = time.time() - t1
    result = metrics_lib.compute_all(labels, score, None, None)
    pixel_curves = None
    if acc is not None:
        acc = acc.all_processes()
        result.update(acc.result())
        pixel_curves = _curves_of(acc)
    elif exact:
        maps = streamed.gather_rows(np.concatenate(all_maps), index, n)
        masks = streamed.gather_rows(np.concatenate(all_masks), index, n)
        result = metrics_lib.compute_all(labels, score, masks, maps, sizes=test.sizes)
        del maps, masks
    result.update({
        "num_images": n, "seconds": test_seconds, "total_seconds": time.time() - t0,
        "images_per_second": n / max(test_seconds, 1e-9),
        "checkpoint_step": det.step, "refine_passes": det.sc.refine_passes,
        "threshold": threshold, "threshold_rule": det.threshold_rule,
        "map_normalization": cfg.eval.map_normalization,
        "device": jax.devices()[0].device_kind, "device_count": jax.device_count()})
    check = None
    normal = labels != 1
    if threshold is not None:
        n_cal = det.num_calibration_images or 0
        quantile = float((det.calibration_record or {}).get("quantile",
                                                           cfg.eval.threshold_quantile))
        result.update(metrics_lib.threshold_sample_check(n_cal, quantile))
        result["calibration_source"] = (det.calibration_record or {}).get(
            "source", calibration.VALIDATION)
        # The test normals against the calibration normals (anomalies are known here).
        check = drift.check(score[normal], threshold, det.expected_rate,
                            det.calibration_scores,
                            thresholds=thresholds[normal] if per_image else None)
        result["drift"] = {k: v for k, v in check.items() if k != "threshold"}
        if check["warning"]:
            log.warning("drift: %s", check["warning"])
        result.update({f"test_{k}": v for k, v in
                       metrics_lib.detection_rates(labels, score, thresholds).items()})
    # The report's images: the sample's panels kept while scoring, the hardest cases (known
    # only now) scored again (a few images; every process takes part; their maps are
    # shown, their decisions are those above).
    from ssm_jax.report import grid

    hardest = grid.hardest(labels, score, cfg.eval.num_overlays)
    shown = np.union1d(sample, hardest).astype(np.int64)
    missing = np.array([i for i in shown if int(i) not in panels], np.int64)
    if len(missing):
        sub = streamed.as_float(test.images[missing])
        again = det.score(sub, None if test.sizes is None else test.sizes[missing])
        for r, i in enumerate(missing):
            panels[int(i)] = {"image": sub[r], "map": again["maps"][r],
                              "restored": again["restored"][r]}
    if jax.process_index() == 0:
        eval_dir = output_dir or storage.join(workdir, rundir.EVAL_DIR)
        storage.makedirs(eval_dir)
        rundir.write_json(storage.join(eval_dir, rundir.METRICS_FILE), result)
        if output_dir is None and not calibration.is_site(site):
            with calibration.writing(workdir):  # a calibrate may have saved one meanwhile
                if not calibration.is_site(calibration.current(workdir)):
                    det.save_calibration()
        view = _ReportSet(test, shown, panels)
        report.write_report(eval_dir, view, {"score": score, "map": view.maps,
                                             "restored": view.restored},
                            result, threshold, cfg.eval.num_overlays,
                            shown=None if len(shown) == n else shown,
                            pixel_curves=pixel_curves,
                            thresholds=thresholds if per_image else None)
        if check is not None:
            drift_report.add_to_report(eval_dir, check, score[normal],
                                       det.calibration_scores, threshold)
    return result


class _ReportSet:
    """The test set as the report reads it: every image's labels, paths, types and sizes;
    images, masks, maps and restorations of the ``shown`` ones only (in that order)."""

    def __init__(self, test, shown: np.ndarray, panels: dict[int, dict]) -> None:
        self.labels, self.paths = test.labels, test.paths
        self.defect_types, self.sizes = test.defect_types, test.sizes
        rows = [panels[int(i)] for i in shown]
        full = None if not rows else rows[0]["map"].shape

        def stack(name: str, pad: bool) -> np.ndarray | None:
            if not rows or any(r[name] is None for r in rows):
                return None
            out = []
            for r in rows:
                a = r[name]
                if pad and a.shape[:2] != full:  # scored in a smaller shape bucket
                    a = np.pad(a, ((0, full[0] - a.shape[0]), (0, full[1] - a.shape[1]),
                                   (0, 0)), mode="edge")
                out.append(a)
            return np.stack(out)

        self.images = stack("image", True)
        self.maps = stack("map", False)
        self.restored = stack("restored", True)
        self.masks = None
        if test.masks is not None and rows:
            self.masks = np.stack([np.asarray(test.masks[int(i)], np.float32) for i in shown])
