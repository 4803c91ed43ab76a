"""Which unlabeled images look out of distribution, and what share of them (docs/usage_gamma_auto.md).

    python -m realmix_tf.outliers --model=experiments/mnist6_mismatch50.1@60-200/RealMix_... \\
        [--dataset=mnist6_mismatch50.1@60-200] [--output=DIR]

--model: a run folder (its export/, else its newest checkpoint), an export folder or a .keras
file. --dataset defaults to the one the model was trained on. Writes to --output (default
{run}/inspect/{dataset}/):
  unlabeled.csv      one row per record of the -unlabel.tfrecord (validation records first):
                     index, split, source (the image file of a `create_datasets custom`
                     record; empty for other datasets), predicted class and name,
                     confidence, ood_score (cosine
                     distance to the nearest class prototype of the labeled images), decision
                     (mask/keep: whether the run's mask, which drops the share gamma ranked
                     lowest by its own ranking, the confidence unless the run's --ood_score is
                     a feature score, would drop it under the estimated gamma) and, for the
                     mismatch sets, origin_class and in_distribution
  summary.json       estimated OOD share and gamma (this estimate), run_gamma (the gamma the
                     run used: its --gamma, or --gamma=auto's last report in
                     stats/gamma_auto.json; why the two differ: WHY_TWO_GAMMAS), the
                     reference used, and with ground truth the true share, the error, the AUROCs of the feature score, of the
                     confidence and of the mask's ranking, and the share of masked images
                     that are truly out of distribution
  histogram.png      the scores of the unlabeled images (split by the truth when known) and of
                     the reference, with the estimate's threshold
  contact_sheet.png  the --sheet most and least in-distribution-looking training images,
                     each titled with its record index (and file name when known)
The score and the estimate are those of --gamma=auto (realmix_tf/ood_share.py).
"""
import csv
import os
import sys
import types

import numpy as np
from absl import flags

from libml.base import cli

from realmix_tf import ood_share

from libml.data import records
from libml.base.errors import UserError
from libml.base.files import atomic_path, check_overwrite, read_json, text_cell, write_json
from libml.data.names import data_dir, parse_dataset_name

FLAGS = flags.FlagValues()
flags.DEFINE_string("model", "", "Run folder, export folder or .keras file.", flag_values=FLAGS)
flags.DEFINE_string("dataset", "", "Dataset (default: the model's own).", flag_values=FLAGS)
flags.DEFINE_string("data_dir", "", "Data folder; default $ML_DATA.", flag_values=FLAGS)
flags.DEFINE_string("output", "", "Output folder (default {run}/inspect/{dataset}).", flag_values=FLAGS)
flags.DEFINE_integer("batch", 512, "Images per inference batch.", flag_values=FLAGS)
flags.DEFINE_integer("sheet", 32, "Images per half of the contact sheet.", flag_values=FLAGS)
flags.DEFINE_bool("overwrite", False, "Replace existing output files.", flag_values=FLAGS)

OUTPUTS = ("unlabeled.csv", "summary.json", "histogram.png", "contact_sheet.png")


# ---------------------------------------------------------------------------------------------
# The model

def load_model(path: str):
    """(net returning logits, metadata dict with at least 'dataset', run folder or None)."""
    from libml.export import saving as export
    if not path or not os.path.exists(path):
        raise UserError(f"--model={path!r} not found: pass a run folder, its export/ folder or a .keras file")
    if path.endswith(".keras"):
        folder = os.path.dirname(os.path.abspath(path))
        return export.load_keras_net(path), _read_json(os.path.join(folder, export.META_FILE)), None
    run_dir = path if os.path.isdir(os.path.join(path, "args")) else None
    for folder in (os.path.join(path, "export"), path):
        keras_file = os.path.join(folder, export.KERAS_FILE)
        if os.path.isfile(keras_file):
            return (export.load_keras_net(keras_file), _read_json(os.path.join(folder, export.META_FILE)),
                    run_dir)
    if run_dir is None:
        raise UserError(f"--model={path} holds no model.keras and is not a run folder: pass a run "
                        f"folder or an export")
    return _checkpoint_net(run_dir), _read_json(os.path.join(run_dir, "args", "args.json")), run_dir


def _checkpoint_net(run_dir: str):
    """The EMA net of the newest checkpoint of a run, rebuilt from its args.json."""
    from libml.export import saving as export
    from libml.nn.wrn import WideResNet
    from libml.run.checkpoints import resolve_checkpoint
    args = _read_json(os.path.join(run_dir, "args", "args.json"))
    shape = tuple(args["image_shape"])
    template = WideResNet(int(args["nclass"]), filters=args["filters"], repeat=args["repeat"],
                          scales=args["scales"])
    return export._restore_source_nets(template, resolve_checkpoint(run_dir),
                                       types.SimpleNamespace(shape=shape))[1]


def _read_json(path: str) -> dict:
    """A run's or an export's JSON file, {} if it is absent."""
    return read_json(path, "re-create it (train or export again)") if os.path.isfile(path) else {}


def features_and_logits_of(net, images: np.ndarray, batch: int):
    """(pooled features [N, D], logits [N, K]) of uint8 images, from one pass."""
    import tensorflow as tf
    from libml.export.saving import normalize
    call = tf.function(lambda x: [tf.cast(t, tf.float32) for t in
                                  net.features_and_logits(normalize(x), training=False)])
    out = [[t.numpy() for t in call(tf.constant(images[i:i + batch]))]
           for i in range(0, len(images), batch)]
    if not out:
        return np.zeros([0, 0], np.float32), np.zeros([0, int(net.nclass)], np.float32)
    return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])


# ---------------------------------------------------------------------------------------------
# The data and the analysis

def load_split(dataset, root: str):
    """(labeled images, labeled labels, unlabeled images, unlabeled labels, truth or None)."""
    how = f"python -m data_prep.create_split (see the README) for {dataset}"
    xl, yl = records.load_numpy(records.require_file(dataset.label_path(root), how))
    xu, yu = records.load_numpy(records.require_file(dataset.unlabel_path(root), how))
    split = _read_json(dataset.map_path(root))
    truth = None
    if "unlabel_in_distribution" in split and len(split["unlabel_in_distribution"]) == len(yu):
        truth = dict(in_distribution=np.array(split["unlabel_in_distribution"], bool),
                     origin_class=np.array(split["unlabel_class"], np.int64),
                     origin_names=split.get("class_names", []))
    return xl, yl, xu, yu, truth


def run_folder_of(path: str, run_dir):
    """The run folder of --model: a run folder itself, or the run that holds an export folder
    or its model.keras (None for a model outside any run)."""
    if run_dir is not None:
        return run_dir
    folder = os.path.abspath(path)
    folder = os.path.dirname(folder) if path.endswith(".keras") else folder
    parent = os.path.dirname(folder.rstrip(os.sep))
    return parent if os.path.isfile(os.path.join(parent, "args", "args.json")) else None


def run_gamma(run_dir, run_args: dict):
    """The gamma the run's mask used at its end, named with where it comes from: with
    --gamma=auto the last record of {run}/stats/gamma_auto.json (what the trainer's last report,
    monitors/gamma and the mask from then on use), else the run's fixed --gamma. None for a
    model without a run (or a run without a mask)."""
    from realmix_tf.gamma_auto import HISTORY_FILE
    history_path = os.path.join(run_dir, HISTORY_FILE) if run_dir else ""
    if history_path and os.path.isfile(history_path):
        history = read_json(history_path, "delete it; training rewrites it at its next report")
        if isinstance(history, list) and history and isinstance(history[-1], dict):
            last = history[-1]
            return dict(gamma=float(last["gamma"]), source=f"--gamma=auto, {HISTORY_FILE} at kimg "
                        f"{last.get('kimg', 0):g} (report {len(history)})",
                        ood_share_estimate=last.get("ood_share_estimate"),
                        ood_share_raw=last.get("ood_share_raw"), n_window=last.get("n_window"),
                        trusted=last.get("trusted"), reports=len(history))
    gamma = run_args.get("gamma")
    if isinstance(gamma, (int, float)) and not isinstance(gamma, bool):
        return dict(gamma=float(gamma), source=f"--gamma={gamma:g}")
    return None


WHY_TWO_GAMMAS = ("the run's gamma is a moving average over its reports (estimate += 0.3 x "
                  "(raw - estimate), starting from 0 once the model is trusted, so it lags a "
                  "rising estimate), each raw estimate on one window of --eval_batch unlabeled "
                  "images with that report's model; outliers estimates once, on every unlabeled "
                  "image, with the final model (its `gamma` is what a new run could pass as "
                  "--gamma)")


def gamma_lines(s: dict) -> list:
    """The printed lines on gamma: the one the run used and outliers' own estimate, each named."""
    fresh = (f"this estimate (final model, all {s['n_unlabeled']} unlabeled images, no "
             f"smoothing): OOD share {s['estimated_ood_share']:.3f}, gamma {s['gamma']:.3f} "
             f"(the CSV's decisions use it)")
    used = s.get("run_gamma")
    if used is None:
        return [fresh]
    line = f"gamma the run used: {used['gamma']:.3f} ({used['source']}"
    if used.get("ood_share_raw") is not None:
        line += f"; that report's raw estimate {used['ood_share_raw']:.3f} on {used['n_window']} images"
    lines = [line + ")", fresh]
    if used["source"].startswith("--gamma=auto"):
        lines.append(f"they differ because {WHY_TWO_GAMMAS}")
    return lines


def mask_ranking(meta: dict) -> str:
    """What the run's mask ranks by: its --ood_score when that is a feature score
    (ood_share.SCORE_KINDS), else the confidence (RealMix as released)."""
    kind = meta.get("ood_score")
    return kind if kind in ood_share.SCORE_KINDS else "confidence"


def analyse(features_labeled, labels_labeled, features_unlabeled, logits_unlabeled, labels_unlabeled,
            nvalid: int, truth=None, nclass=None, score: str = ood_share.DEFAULT_SCORE,
            mask_by: str = "confidence") -> dict:
    """Scores, estimate and per-image decisions, as --gamma=auto makes them at a report (on the
    whole unlabeled set instead of one window, without smoothing). score: the feature score
    of the estimate (ood_share.SCORE_KINDS); mask_by: what the mask ranks by, "confidence"
    (max softmax of the un-augmented prediction; in training the mask ranks the mixed
    predictions) or a feature score (with the labeled images' prototypes, where the step keeps
    a moving average of them)."""
    nvalid = min(nvalid, len(features_unlabeled))
    nclass = int(nclass or np.asarray(logits_unlabeled).shape[1])
    valid_labels = np.asarray(labels_unlabeled[:nvalid])
    estimate, fs = ood_share.estimate_from_features(
        features_labeled, labels_labeled, features_unlabeled, features_unlabeled[:nvalid],
        valid_labels, nclass, kind=score)
    scores, reference = fs.scores, fs.reference
    train_scores = scores[nvalid:]
    gamma = min(estimate.share, ood_share.MAX_GAMMA)
    # The mask drops the gamma least in-distribution by its own ranking: the gamma-quantile.
    confidence = ood_share.confidence_score(logits_unlabeled)
    if mask_by == "confidence":
        ranking = confidence
    elif mask_by == score:
        ranking = scores
    else:
        ranking = ood_share.reference_scores(features_labeled, labels_labeled, features_unlabeled,
                                             nclass=nclass, kind=mask_by).scores
    cut = float(np.quantile(ranking[nvalid:], gamma)) if gamma > 0 and len(train_scores) else -np.inf
    masked = ranking <= cut
    summary = dict(estimated_ood_share=estimate.share, gamma=gamma, score=f"{score}_cosine",
                   mask_ranks_by=mask_by, reference=fs.name, n_reference=estimate.n_reference,
                   calibration_shift=fs.shift, n_unlabeled=int(len(train_scores)), n_valid=nvalid,
                   n_masked=int(masked[nvalid:].sum()),
                   bbe_threshold=estimate.threshold, bbe_reference_above=estimate.reference_above,
                   bbe_unlabeled_above=estimate.mixture_above)
    if truth is not None:
        inside = truth["in_distribution"][nvalid:]
        true_share = float(1.0 - inside.mean()) if len(inside) else None
        masked_train = masked[nvalid:]
        train_ranking, train_confidence = ranking[nvalid:], confidence[nvalid:]
        summary.update(true_ood_share=true_share,
                       share_error=None if true_share is None else estimate.share - true_share,
                       auroc=ood_share.auroc(train_scores[inside], train_scores[~inside]),
                       auroc_reference=ood_share.auroc(reference, train_scores[~inside]),
                       auroc_confidence=ood_share.auroc(train_confidence[inside],
                                                        train_confidence[~inside]),
                       auroc_mask=ood_share.auroc(train_ranking[inside], train_ranking[~inside]),
                       masked_ood_share=float(np.mean(~inside[masked_train])) if masked_train.any() else None,
                       ood_masked_share=float(np.mean(masked_train[~inside])) if (~inside).any() else None)
    return dict(summary=summary, scores=scores, reference=reference, masked=masked)


# ---------------------------------------------------------------------------------------------
# Outputs

def write_csv(path: str, result: dict, logits, nvalid: int, class_names, truth, sources=()) -> None:
    """ood_score = 1 - the similarity score: the cosine distance to the nearest prototype (or
    labeled image, with the knn score). sources: the image file of each record ("" unknown)."""
    probs = np.exp(logits - logits.max(1, keepdims=True))
    probs /= probs.sum(1, keepdims=True)
    predicted = probs.argmax(1)
    header = ["index", "split", "source", "predicted_class", "class_name", "confidence", "ood_score",
              "decision"]
    if truth is not None:
        header += ["origin_class", "origin_name", "in_distribution"]
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for i, k in enumerate(predicted):
            row = [i, "valid" if i < nvalid else "train", text_cell(sources[i]) if i < len(sources) else "", int(k),
                   class_names[k] if k < len(class_names) else "", f"{probs[i, k]:.6f}",
                   f"{1.0 - result['scores'][i]:.6f}", "mask" if result["masked"][i] else "keep"]
            if truth is not None:
                c = int(truth["origin_class"][i])
                names = truth["origin_names"]
                row += [c, names[c] if 0 <= c < len(names) else "", int(truth["in_distribution"][i])]
            writer.writerow(row)


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def write_histogram(path: str, result: dict, nvalid: int, truth) -> None:
    plt = _pyplot()
    ood, reference = 1.0 - result["scores"][nvalid:], 1.0 - result["reference"]
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    bins = np.histogram_bin_edges(np.r_[ood, reference], bins=40)
    if truth is not None:
        inside = truth["in_distribution"][nvalid:]
        ax.hist([ood[inside], ood[~inside]], bins=bins, stacked=True,
                label=["unlabeled, in distribution", "unlabeled, out of distribution"])
    else:
        ax.hist(ood, bins=bins, label="unlabeled")
    ax.hist(reference, bins=bins, histtype="step", color="k", density=False,
            label=f"reference ({result['summary']['reference']})")
    s = result["summary"]
    ax.axvline(1.0 - s["bbe_threshold"], color="r", ls="--",
               label="estimate's threshold: left of it counted as in-distribution")
    title = f"estimated OOD share {s['estimated_ood_share']:.2f}"
    if s.get("true_ood_share") is not None:
        title += f" (true {s['true_ood_share']:.2f}, AUROC {s['auroc'] if s['auroc'] is None else round(s['auroc'], 3)})"
    ax.set(xlabel=f"OOD score = cosine distance ({s['score']})", ylabel="images",
           title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def write_contact_sheet(path: str, images: np.ndarray, result: dict, nvalid: int, count: int,
                        sources=()) -> None:
    """Top rows: the `count` most in-distribution-looking training images; bottom rows: the
    `count` least (each image titled with its record index, its file name when `sources`
    knows it, and its OOD score)."""
    plt = _pyplot()
    scores = result["scores"]
    order = nvalid + np.argsort(-scores[nvalid:], kind="stable")
    count = max(1, min(count, len(order) // 2 or 1))
    groups = [("most in-distribution", order[:count]), ("least in-distribution", order[::-1][:count])]
    cols = min(count, 8)
    rows = -(-count // cols)
    fig, axes = plt.subplots(2 * rows, cols, figsize=(cols * 1.1, 2 * rows * 1.25 + 0.4),
                             dpi=100, squeeze=False)
    for g, (label, chosen) in enumerate(groups):
        for j in range(rows * cols):
            ax = axes[g * rows + j // cols][j % cols]
            ax.axis("off")
            if j < len(chosen):
                i = int(chosen[j])
                image = images[i]
                ax.imshow(image[..., 0] if image.shape[-1] == 1 else image, cmap="gray",
                          vmin=0, vmax=255)
                head = f"{label}:\n" if j == 0 else "\n"
                name = os.path.basename(sources[i])[:14] + "\n" if i < len(sources) and sources[i] else ""
                ax.set_title(f"{head}#{i} {name}{1 - scores[i]:.2f}", fontsize=6,
                             loc="left" if j == 0 else "center")
    fig.tight_layout()
    fig.savefig(path, format="png")
    plt.close(fig)


def inspect(model: str, dataset: str = "", root: str = "", output: str = "", batch: int = 512,
            sheet: int = 32, overwrite: bool = False) -> dict:
    """Writes the four outputs; returns the summary (with 'output': the folder)."""
    if batch < 1 or sheet < 1:
        raise UserError(f"--batch={batch}, --sheet={sheet}: both must be >= 1")
    net, meta, run_dir = load_model(model)
    name = parse_dataset_name(dataset or meta.get("dataset", ""))
    root = data_dir(root)
    if not output:
        if run_dir is None:
            raise UserError("no --output given: pass an output folder (the default needs a run folder)")
        output = os.path.join(run_dir, "inspect", str(name))
    paths = {k: os.path.join(output, k) for k in OUTPUTS}
    for path in paths.values():
        check_overwrite(path, overwrite)
    xl, yl, xu, yu, truth = load_split(name, root)
    sources = records.load_sources(name.unlabel_path(root))     # "" where the records have none
    owner = run_folder_of(model, run_dir)
    run_args = _read_json(os.path.join(owner, "args", "args.json")) if owner else {}
    shape = meta.get("image_shape") or [meta.get(k) for k in ("height", "width", "channels")]
    if None not in shape and tuple(xu.shape[1:]) != tuple(shape):
        raise UserError(f"{name} holds {'x'.join(map(str, xu.shape[1:]))} images, the model takes "
                        f"{'x'.join(map(str, shape))}: pass the dataset the model was trained on")
    features_u, logits_u = features_and_logits_of(net, xu, batch)
    features_l = features_and_logits_of(net, xl, batch)[0]
    result = analyse(features_l, yl, features_u, logits_u, yu, name.nvalid, truth,
                     nclass=int(logits_u.shape[1]), mask_by=mask_ranking(dict(run_args, **meta)))
    os.makedirs(output, exist_ok=True)
    class_names = list(meta.get("class_names", []))
    summary = dict(result["summary"], dataset=str(name), model=model,
                   run_gamma=run_gamma(owner, run_args or {}))
    writers = {"unlabeled.csv": lambda p: write_csv(p, result, logits_u, name.nvalid, class_names, truth,
                                                    sources),
               "summary.json": lambda p: write_json(p, summary, overwrite=True),
               "histogram.png": lambda p: write_histogram(p, result, name.nvalid, truth),
               "contact_sheet.png": lambda p: write_contact_sheet(p, xu, result, name.nvalid, sheet,
                                                                  sources)}
    for key, write in writers.items():
        with atomic_path(paths[key], overwrite) as tmp:
            write(tmp)
    return dict(summary, output=output)


def main(argv=None):
    rest = cli.parse(FLAGS, argv)
    if rest:
        raise UserError(f"unexpected arguments {' '.join(rest)}: every option is a --flag")
    s = inspect(FLAGS.model, FLAGS.dataset, FLAGS.data_dir, FLAGS.output, FLAGS.batch, FLAGS.sheet,
                FLAGS.overwrite)
    line = f"reference: {s['reference']}"
    if s.get("true_ood_share") is not None:
        fmt = lambda v: "n/a" if v is None else f"{v:.3f}"
        line += (f"; true share {s['true_ood_share']:.3f}, AUROC of the {s['score']} score "
                 f"{fmt(s['auroc'])}, of the mask's ranking ({s['mask_ranks_by']}) "
                 f"{fmt(s['auroc_mask'])}; masked images truly OOD {fmt(s['masked_ood_share'])}")
    lines = gamma_lines(s) + [line, f"wrote {', '.join(OUTPUTS)} to {s['output']}"]
    print("\n".join(lines), file=sys.stderr)
    return 0


if __name__ == "__main__":
    cli.run(main, FLAGS)
