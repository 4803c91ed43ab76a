"""realmix_tf.outliers on a tiny finished run: one CSV row per unlabeled record with the truth of
the -map.json, the summary, and the two PNGs; run folder, export and errors."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from realmix_tf import ood_share

from libml.train import trainer as train
from libml.train.config import TrainConfig
from libml.base.errors import UserError
from realmix_tf import outliers as inspect
from realmix_tf.realmix import RealMix
from tests.fixtures_data import make_ssl_dataset, test_options

NUNLABELED, NVALID = 48, 8


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    # Unlabeled records 1, 4, 7, ... are "out of distribution" (label -1, origin class 9).
    outliers = np.arange(NUNLABELED) % 3 == 1
    labels = np.where(outliers, -1, np.arange(NUNLABELED) % 3)
    toy = make_ssl_dataset(tmp_path_factory.mktemp("data"), nlabeled=16, nunlabeled=NUNLABELED,
                           nvalid=NVALID, ntest=16, size=8, unlabeled_labels=labels)
    with open(toy.unlabel_path.replace("-unlabel.tfrecord", "-map.json"), "w") as f:
        json.dump({"label": [], "unlabel": list(range(NUNLABELED)),
                   "unlabel_class": np.where(outliers, 9, labels).tolist(),
                   "unlabel_in_distribution": (~outliers).tolist(),
                   "class_names": [f"c{i}" for i in range(10)]}, f)
    config = TrainConfig(dataset=toy.name, data_dir=toy.root,
                               train_dir=str(tmp_path_factory.mktemp("runs")), batch=8, filters=8,
                               repeat=1, train_kimg=0.0625, report_kimg=0.03125, save_kimg=0.03125,
                               eval_batch=64, progress=False, short_run_scaling=True,
                               algorithm=dict(gamma=0.25))
    trainer = train.Trainer(config, RealMix.from_config, "RealMix", data_options=test_options())
    trainer.run()
    return toy, trainer, outliers


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_run_folder_writes_csv_summary_and_pngs(tiny_run):
    toy, trainer, outliers = tiny_run
    s = inspect.inspect(trainer.run_dir, root=toy.root, batch=16, sheet=4)
    out = os.path.join(trainer.run_dir, "inspect", toy.name)
    assert s["output"] == out and sorted(os.listdir(out)) == sorted(inspect.OUTPUTS)
    rows = _rows(os.path.join(out, "unlabeled.csv"))
    assert [int(r["index"]) for r in rows] == list(range(NUNLABELED))
    assert [r["split"] for r in rows] == ["valid"] * NVALID + ["train"] * (NUNLABELED - NVALID)
    assert {r["source"] for r in rows} == {""}          # the toy records carry no file path
    assert [r["in_distribution"] for r in rows] == [str(int(not o)) for o in outliers]
    assert {r["origin_class"] for r in rows if r["in_distribution"] == "0"} == {"9"}
    assert all(r["class_name"] == f"class{r['predicted_class']}" for r in rows)
    confidence = np.array([float(r["confidence"]) for r in rows])
    ood = np.array([float(r["ood_score"]) for r in rows])
    # ood_score: the cosine distance of the EMA net's pooled features to the nearest class
    # prototype of the labeled images', computed here independently of realmix_tf.ood_share.
    net = trainer.model.ema_net
    pooled = lambda x: net.features_and_logits(x.astype(np.float32) * (2 / 255) - 1)[0].numpy()
    unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
    fl, fu = unit(pooled(toy.labeled[0])), unit(pooled(toy.unlabeled[0]))
    yl = np.asarray(toy.labeled[1])
    classes = sorted(set(yl.tolist()))
    protos = unit(np.stack([fl[yl == k].sum(0) for k in classes]))
    np.testing.assert_allclose(ood, 1 - (fu @ protos.T).max(1), atol=1e-4)
    # The decision: RealMix's mask drops the gamma least confident training images.
    train_rows = [r for r in rows if r["split"] == "train"]
    masked = sum(r["decision"] == "mask" for r in train_rows)
    assert abs(masked - s["gamma"] * len(train_rows)) <= 1 + 0.05 * len(train_rows)
    cut = max((float(r["confidence"]) for r in train_rows if r["decision"] == "mask"), default=-np.inf)
    assert all(float(r["confidence"]) >= cut for r in train_rows if r["decision"] == "keep")
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["n_unlabeled"] == NUNLABELED - NVALID and summary["n_valid"] == NVALID
    # Reference: the 16 labeled images (leave one out) + the validation images with a label.
    valid_known = int((~outliers[:NVALID]).sum())
    assert summary["reference"] == "labeled+valid" and summary["n_reference"] == 16 + valid_known
    assert summary["score"] == "prototype_cosine" and summary["mask_ranks_by"] == "confidence"
    assert summary["calibration_shift"] == 0.0          # not calibrated (ood_share.CALIBRATE)
    assert summary["n_masked"] == masked
    assert summary["true_ood_share"] == pytest.approx(outliers[NVALID:].mean())
    assert summary["share_error"] == pytest.approx(summary["estimated_ood_share"] - summary["true_ood_share"])
    similarity, inside = 1 - ood[NVALID:], ~outliers[NVALID:]
    assert summary["auroc"] == pytest.approx(ood_share.auroc(similarity[inside], similarity[~inside]))
    # reference: each labeled image against the prototypes with itself left out of its own
    loo = []
    for i, k in enumerate(yl):
        own = [fl[(yl == c) & (np.arange(len(yl)) != i)].sum(0) for c in classes]
        loo.append(max(float(fl[i] @ v / np.linalg.norm(v)) if np.linalg.norm(v) > 0 else -1.0 for v in own))
    reference = np.r_[loo, (fu[:NVALID][~outliers[:NVALID]] @ protos.T).max(1)]
    assert summary["auroc_reference"] == pytest.approx(ood_share.auroc(reference, similarity[~inside]),
                                                       abs=1e-3)
    # (the tiny model's scores agree with these to 1e-4 and many lie within 1e-3 of each
    # other, which can move an image or two of the 40 across the threshold)
    assert summary["estimated_ood_share"] == pytest.approx(
        ood_share.estimate_share(reference, similarity).share, abs=0.05)
    # the mask's ranking is the confidence here; masked images truly out of distribution
    conf_train = confidence[NVALID:]
    assert summary["auroc_mask"] == summary["auroc_confidence"] == pytest.approx(
        ood_share.auroc(conf_train[inside], conf_train[~inside]), abs=1e-3)
    is_masked = np.array([r["decision"] == "mask" for r in train_rows])
    if is_masked.any():
        assert summary["masked_ood_share"] == pytest.approx(np.mean(~inside[is_masked]))
    assert summary["ood_masked_share"] == pytest.approx(np.mean(is_masked[~inside]))
    for png in ("histogram.png", "contact_sheet.png"):
        with Image.open(os.path.join(out, png)) as image:
            assert image.format == "PNG" and min(image.size) > 100


def test_export_and_checkpoint_give_the_same_scores_and_no_overwrite(tiny_run, tmp_path):
    toy, trainer, _ = tiny_run
    first = os.path.join(trainer.run_dir, "inspect", toy.name, "unlabeled.csv")
    if not os.path.exists(first):
        inspect.inspect(trainer.run_dir, root=toy.root, batch=16, sheet=4)
    out = str(tmp_path / "from_export")
    s = inspect.inspect(os.path.join(trainer.run_dir, "export"), dataset=toy.name, root=toy.root,
                        output=out, batch=16, sheet=4)
    assert s["dataset"] == toy.name
    a, b = _rows(first), _rows(os.path.join(out, "unlabeled.csv"))
    np.testing.assert_allclose([float(r["ood_score"]) for r in a], [float(r["ood_score"]) for r in b],
                               atol=1e-4)
    with pytest.raises(UserError, match="exists"):
        inspect.inspect(os.path.join(trainer.run_dir, "export"), root=toy.root, output=out)
    # A run folder without export/: the EMA net of its newest checkpoint, rebuilt from args.json.
    bare = tmp_path / "bare_run"
    for part in ("args", "tf"):
        shutil.copytree(os.path.join(trainer.run_dir, part), bare / part)
    inspect.inspect(str(bare), root=toy.root, batch=16, sheet=4)
    c = _rows(bare / "inspect" / toy.name / "unlabeled.csv")
    np.testing.assert_allclose([float(r["ood_score"]) for r in a], [float(r["ood_score"]) for r in c],
                               atol=1e-4)


def test_errors(tiny_run, tmp_path):
    toy, trainer, _ = tiny_run
    with pytest.raises(UserError, match="not found"):
        inspect.inspect(str(tmp_path / "nothing"), root=toy.root)
    with pytest.raises(UserError, match="no --output"):
        inspect.inspect(os.path.join(trainer.run_dir, "export", "model.keras"), root=toy.root)


def test_analyse_reports_the_masks_own_ranking_and_what_it_masks():
    """Synthetic features and logits with a known truth: 4 training images in, 4 out; the
    confidence ranks one outlier above every inlier, the prototype score separates them."""
    labeled = np.array([[1.0, 0.0, 0.0], [1.0, 0.1, 0.0], [0.0, 1.0, 0.0], [0.1, 1.0, 0.0]])
    labels_labeled = np.array([0, 0, 1, 1])
    # unlabeled: 2 validation images (class 0, outlier), then 8 training images
    unlabeled = np.array([[1.0, 0.05, 0.0], [0.0, 0.0, 1.0],
                          [1.0, 0.0, 0.1], [0.0, 1.0, 0.1], [0.9, 0.1, 0.0], [0.1, 0.9, 0.0],
                          [0.3, 0.0, 1.0], [0.0, 0.3, 1.0], [0.2, 0.2, 1.0], [0.1, 0.0, 1.0]])
    inside = np.r_[True, False, [True] * 4, [False] * 4]
    # confidence (top logit): inliers 2, 3, 4, 5; outliers 1, 0, 6 (very confident), 0.5
    top = np.array([5.0, 1.0, 2.0, 3.0, 4.0, 5.0, 1.0, 0.0, 6.0, 0.5])
    logits = np.stack([top, np.zeros(10)], axis=1)
    truth = dict(in_distribution=inside, origin_class=np.where(inside, 0, 9), origin_names=[])
    out = inspect.analyse(labeled, labels_labeled, unlabeled, logits, np.array([0, -1] + [0] * 8),
                          nvalid=2, truth=truth, nclass=2)
    s = out["summary"]
    train_in, train_out = top[2:][inside[2:]], top[2:][~inside[2:]]
    # AUROC of the confidence: pairs (in > out) of inliers {2,3,4,5} vs outliers {1,0,6,.5}:
    # 2 beats 3 of 4, 3: 3, 4: 3, 5: 3 -> 12 / 16
    assert s["mask_ranks_by"] == "confidence" and s["auroc_mask"] == s["auroc_confidence"] == 0.75
    assert s["auroc_mask"] == ood_share.auroc(train_in, train_out)
    assert s["auroc"] == 1.0                       # the prototype score separates them
    # 5 reference images: the estimate is 0.7 here (truth 0.5); gamma 0.7 of 8 training images
    # by confidence masks the 5 lowest, 0, 0.5, 1 (outliers) and 2, 3 (inliers)
    masked = out["masked"][2:]
    assert s["gamma"] == pytest.approx(0.7) and s["n_masked"] == masked.sum() == 5
    np.testing.assert_array_equal(masked, top[2:] <= 3.0)
    assert s["masked_ood_share"] == pytest.approx(3 / 5) and s["ood_masked_share"] == pytest.approx(3 / 4)
    # ranked by the prototype score instead, the mask drops the outliers first
    by_score = inspect.analyse(labeled, labels_labeled, unlabeled, logits, np.array([0, -1] + [0] * 8),
                               nvalid=2, truth=truth, nclass=2, mask_by="prototype")["summary"]
    assert by_score["mask_ranks_by"] == "prototype" and by_score["auroc_mask"] == 1.0
    # (6 masked: np.quantile interpolates, and the cut is <=): all 4 outliers and 2 inliers
    assert by_score["n_masked"] == 6
    assert by_score["masked_ood_share"] == pytest.approx(4 / 6) and by_score["ood_masked_share"] == 1.0
    assert inspect.mask_ranking({"ood_score": "prototype"}) == "prototype"
    assert inspect.mask_ranking({"ood_score": "confidence"}) == inspect.mask_ranking({}) == "confidence"



def test_the_csv_names_the_image_file_of_records_that_carry_one(tiny_run, tmp_path):
    """Records of `create_datasets custom` carry their file's path (feature `source`, copied
    by create_split): the CSV's source column gives it; records without one: empty."""
    import tensorflow as tf
    from libml.data import records
    toy, trainer, _ = tiny_run
    root = tmp_path / "data"
    shutil.copytree(toy.root, root)
    unlabel = toy.unlabel_path.replace(toy.root, str(root))
    named = []
    for i, (record, label) in enumerate(zip(records.iterate_serialized(unlabel),
                                            records.load_labels(unlabel).tolist())):
        png = tf.train.Example.FromString(record).features.feature["image"].bytes_list.value[0]
        named.append(records.serialize_example(png, label, f"/photos/u{i:02d}.png" if i % 2 else None))
    records.write_serialized(unlabel, named, overwrite=True)
    inspect.inspect(trainer.run_dir, root=str(root), output=str(tmp_path / "out"), batch=16, sheet=4)
    rows = _rows(tmp_path / "out" / "unlabeled.csv")
    assert [r["source"] for r in rows] == [f"/photos/u{i:02d}.png" if i % 2 else "" for i in range(NUNLABELED)]


def test_the_gamma_the_run_used_is_named_beside_this_estimate(tiny_run, tmp_path, capsys):
    """Issue 24: the run's gamma (its fixed --gamma, or --gamma=auto's last report) and
    outliers' own estimate, each named, in summary.json and on the console."""
    toy, trainer, _ = tiny_run
    out = str(tmp_path / "fixed")
    assert inspect.main(["outliers", f"--model={trainer.run_dir}", f"--data_dir={toy.root}",
                         f"--output={out}", "--batch=16", "--sheet=4"]) == 0
    with open(os.path.join(out, "summary.json")) as f:
        summary = json.load(f)
    assert summary["run_gamma"] == {"gamma": 0.25, "source": "--gamma=0.25"}
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "gamma the run used: 0.250 (--gamma=0.25)"
    assert err[1] == (f"this estimate (final model, all {NUNLABELED - NVALID} unlabeled images, no "
                      f"smoothing): OOD share {summary['estimated_ood_share']:.3f}, gamma "
                      f"{summary['gamma']:.3f} (the CSV's decisions use it)")
    # --gamma=auto: the last record of stats/gamma_auto.json, found from the run's export folder.
    run = tmp_path / "auto_run"
    for part in ("args", "tf", "export"):
        shutil.copytree(os.path.join(trainer.run_dir, part), run / part)
    (run / "stats").mkdir()
    history = [dict(step=32, kimg=0.03125, gamma=0.0, ood_share_estimate=0.0, ood_share_raw=None,
                    trusted=False, n_window=40),
               dict(step=64, kimg=0.0625, gamma=0.185, ood_share_estimate=0.185,
                    ood_share_raw=0.3, trusted=True, n_window=40)]
    (run / "stats" / "gamma_auto.json").write_text(json.dumps(history))
    s = inspect.inspect(str(run / "export"), dataset=toy.name, root=toy.root,
                        output=str(tmp_path / "auto"), batch=16, sheet=4)
    assert s["run_gamma"] == dict(gamma=0.185, source="--gamma=auto, stats/gamma_auto.json at "
                                  "kimg 0.0625 (report 2)", ood_share_estimate=0.185,
                                  ood_share_raw=0.3, n_window=40, trusted=True, reports=2)
    lines = inspect.gamma_lines(s)
    assert lines[0] == ("gamma the run used: 0.185 (--gamma=auto, stats/gamma_auto.json at kimg "
                        "0.0625 (report 2); that report's raw estimate 0.300 on 40 images)")
    assert lines[2].startswith("they differ because the run's gamma is a moving average")
    # A model outside any run: only this estimate.
    assert inspect.run_gamma(None, {}) is None
