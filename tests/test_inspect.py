"""realmix_tf.inspect on a tiny finished run: one CSV row per unlabeled record with the truth of
the -map.json, the summary, and the two PNGs; run folder, export and errors."""
import csv
import json
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from libml import ood_share, train
from libml.config import TrainConfig
from libml.errors import UserError
from realmix_tf import inspect
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
    assert [r["in_distribution"] for r in rows] == [str(int(not o)) for o in outliers]
    assert {r["origin_class"] for r in rows if r["in_distribution"] == "0"} == {"9"}
    assert all(r["class_name"] == f"class{r['predicted_class']}" for r in rows)
    confidence = np.array([float(r["confidence"]) for r in rows])
    ood = np.array([float(r["ood_score"]) for r in rows])
    # ood_score: the cosine distance of the EMA net's pooled features to the nearest labeled
    # image's, computed here independently of libml.ood_share.
    net = trainer.model.ema_net
    pooled = lambda x: net.features_and_logits(x.astype(np.float32) * (2 / 255) - 1)[0].numpy()
    unit = lambda f: f / np.linalg.norm(f, axis=1, keepdims=True)
    fl, fu = unit(pooled(toy.labeled[0])), unit(pooled(toy.unlabeled[0]))
    np.testing.assert_allclose(ood, 1 - (fu @ fl.T).max(1), atol=1e-4)
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
    assert summary["score"] == "knn_cosine"
    assert summary["true_ood_share"] == pytest.approx(outliers[NVALID:].mean())
    assert summary["share_error"] == pytest.approx(summary["estimated_ood_share"] - summary["true_ood_share"])
    similarity, inside = 1 - ood[NVALID:], ~outliers[NVALID:]
    assert summary["auroc"] == pytest.approx(ood_share.auroc(similarity[inside], similarity[~inside]))
    sl = fl @ fl.T
    np.fill_diagonal(sl, -np.inf)
    reference = np.r_[sl.max(1), (fu[:NVALID][~outliers[:NVALID]] @ fl.T).max(1)]
    assert summary["auroc_reference"] == pytest.approx(ood_share.auroc(reference, similarity[~inside]), abs=1e-3)
    assert summary["estimated_ood_share"] == pytest.approx(
        ood_share.estimate_share(reference, similarity).share, abs=0.02)
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
