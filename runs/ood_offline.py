"""Offline measurement of issue 21's OOD scores and share estimate (no training).

    python -m runs.ood_offline --synthetic                      # tests/ood_synthetic.py worlds
    python -m runs.ood_offline --runs=RUN_DIR[,RUN_DIR...] --data_dir=ML_DATA   # trained runs

--synthetic: for every failure mode of tests/ood_synthetic.py and mismatch level, 3 seeds:
the error of the share estimate before issue 21 (kNN score, raw labeled reference, plain BBE),
after (ood_share.estimate_from_features: the prototype score) and after with the calibrated
reference and the split BBE (calibrate_labeled=True, split=True), and the AUROC (in vs out) of
the kNN score, of the prototype score and of the confidence of a cosine classifier over the
prototypes (temperature 10: a stand-in, the synthetic worlds have no trained classifier).
--runs: for each finished run of a mismatch set (the truth is in its -map.json): the AUROC of
the confidence (max softmax of the EMA model, what RealMix's mask ranks by), of the prototype
score and of the kNN score on the training unlabeled images, and the share estimates before
and after, against the truth, and the run's gamma trace: one JSON line per run.
"""
import json
import os
import sys

import numpy as np
from absl import flags

from libml.base import cli

from realmix_tf import ood_share

FLAGS = flags.FlagValues()
flags.DEFINE_bool("synthetic", False, "Measure on the synthetic worlds.", flag_values=FLAGS)
flags.DEFINE_list("runs", [], "Run folders to measure.", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "Data folder of the runs; default $ML_DATA.", flag_values=FLAGS)
flags.DEFINE_list("seeds", ["0", "1", "2"], "Seeds of the synthetic worlds.", flag_values=FLAGS)

LEVELS = (0.0, 0.25, 0.5, 0.75, 1.0)


def _old_estimate(labeled, unlabeled, valid, valid_labels) -> float:
    reference, scores, _ = ood_share.feature_scores(labeled, unlabeled, valid[valid_labels >= 0])
    return ood_share.estimate_share(reference, scores).share


def _aurocs(scores: dict, inside) -> dict:
    return {k: ood_share.auroc(v[inside], v[~inside]) for k, v in scores.items()}


def _softmax_confidence(logits) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    return (p / p.sum(1, keepdims=True)).max(1)


def synthetic(seeds) -> list:
    from tests.ood_synthetic import MODES, NCLASS, make_world
    rows = []
    for mode in MODES:
        for share in LEVELS:
            old, new, cal, auc = [], [], [], []
            for seed in seeds:
                w = make_world(mode, share, seed, spread=1.0)
                old.append(_old_estimate(w.labeled, w.unlabeled, w.valid, w.valid_labels) - w.share)
                est, _ = ood_share.estimate_from_features(w.labeled, w.labeled_labels, w.unlabeled,
                                                          w.valid, w.valid_labels, NCLASS)
                new.append(est.share - w.share)
                est, _ = ood_share.estimate_from_features(w.labeled, w.labeled_labels, w.unlabeled,
                                                          w.valid, w.valid_labels, NCLASS,
                                                          calibrate_labeled=True, split=True)
                cal.append(est.share - w.share)
                if 0 < share < 1:
                    protos = ood_share.prototypes(w.labeled, w.labeled_labels, NCLASS)
                    unit = w.unlabeled / np.linalg.norm(w.unlabeled, axis=1, keepdims=True)
                    auc.append(_aurocs(dict(
                        knn=ood_share.knn_similarity(w.unlabeled, w.labeled),
                        prototype=ood_share.prototype_similarity(w.unlabeled, protos)[0],
                        confidence=_softmax_confidence(10.0 * unit @ protos.T)), w.inside))
            rows.append(dict(mode=mode, share=share, old=old, new=new, calibrated=cal,
                             auroc={k: [a[k] for a in auc] for k in ("knn", "prototype", "confidence")}
                             if auc else {}))
    return rows


def measure_run(run_dir: str, root: str) -> dict:
    from libml.data.names import data_dir, parse_dataset_name
    from realmix_tf import outliers
    net, meta, _ = outliers.load_model(run_dir)
    name = parse_dataset_name(meta["dataset"])
    xl, yl, xu, yu, truth = outliers.load_split(name, data_dir(root))
    if truth is None:
        raise ValueError(f"{name} has no ground truth (not a mismatch set)")
    fu, logits = outliers.features_and_logits_of(net, xu, 512)
    fl = outliers.features_and_logits_of(net, xl, 512)[0]
    nv, nclass = name.nvalid, int(logits.shape[1])
    inside = truth["in_distribution"][nv:]
    protos = ood_share.prototypes(fl, yl, nclass)
    scores = dict(confidence=_softmax_confidence(logits[nv:]),
                  prototype=ood_share.prototype_similarity(fu[nv:], protos)[0],
                  knn=ood_share.knn_similarity(fu[nv:], fl))
    new, fs = ood_share.estimate_from_features(fl, yl, fu[nv:], fu[:nv], yu[:nv], nclass)
    knn_new, _ = ood_share.estimate_from_features(fl, yl, fu[nv:], fu[:nv], yu[:nv], nclass, kind="knn")
    calibrated, _ = ood_share.estimate_from_features(fl, yl, fu[nv:], fu[:nv], yu[:nv], nclass,
                                                     calibrate_labeled=True, split=True)
    # the scores' medians: labeled (leave one out), labeled validation, unlabeled in / out
    loo = ood_share.prototype_similarity_loo(fl, yl, nclass)
    valid = fu[:nv][yu[:nv] >= 0]
    medians = dict(labeled_loo=float(np.median(loo)),
                   valid=float(np.median(ood_share.prototype_similarity(valid, protos)[0]))
                   if len(valid) else None,
                   unlabeled_in=float(np.median(scores["prototype"][inside])) if inside.any() else None,
                   unlabeled_out=float(np.median(scores["prototype"][~inside])) if (~inside).any() else None)
    history_path = os.path.join(run_dir, "stats", "gamma_auto.json")
    history = json.load(open(history_path)) if os.path.exists(history_path) else []
    return dict(run=os.path.basename(run_dir), dataset=str(name),
                true_share=float(1 - inside.mean()),
                auroc=_aurocs(scores, inside) if 0 < inside.mean() < 1 else {},
                old=_old_estimate(fl, fu[nv:], fu[:nv], yu[:nv]), new=new.share, new_knn=knn_new.share,
                calibrated=calibrated.share, prototype_medians=medians, n_valid_labeled=fs.n_valid,
                gamma_trace=[(h["step"], h["ood_share_raw"], h["gamma"], h["trusted"]) for h in history])


def _fmt(values) -> str:
    return " / ".join("–" if v is None else f"{v:+.2f}" for v in values)


def main(argv=None):
    rest = cli.parse(FLAGS, argv)
    if rest:
        print(f"unexpected arguments {' '.join(rest)}", file=sys.stderr)
        return 2
    if FLAGS.synthetic:
        rows = synthetic([int(s) for s in FLAGS.seeds])
        print("| mode | share | error before | error after | after, calibrated + split | AUROC kNN "
              "| AUROC prototype | AUROC confidence (stand-in) |")
        print("|---|---|---|---|---|---|---|---|")
        for r in rows:
            a = r["auroc"]
            au = lambda k: " / ".join(f"{v:.3f}" for v in a[k]) if a else "–"
            print(f"| {r['mode']} | {r['share']:.2f} | {_fmt(r['old'])} | {_fmt(r['new'])} "
                  f"| {_fmt(r['calibrated'])} | {au('knn')} "
                  f"| {au('prototype')} | {au('confidence')} |")
    for run_dir in FLAGS.runs:
        print(json.dumps(measure_run(run_dir, FLAGS.data_dir)))
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
