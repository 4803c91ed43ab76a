"""predict's "none of these classes" signal (issue 24 item 11): the export's OOD reference
(class prototypes of the EMA features, threshold calibrated on labeled validation images), the
ood_score / ood columns, foreign images scoring as more outlying, older exports still predicting."""
import csv
import os
import shutil

import numpy as np
import pytest
from PIL import Image

from libml.base.errors import UserError
from libml.data import records
from libml.export import ood_reference, saving
from libml.train import run_modes
from realmix_tf import predict
from tests.fixtures_data import toy_images
from tests.test_train import finished_run, make_trainer, tiny_config, toy  # noqa: F401 (fixtures)


def plain_features(export_dir, images):
    """Pooled features of the exported plain-Keras model (what predict scores)."""
    fn, _, _ = saving.load_classifier(os.path.join(export_dir, saving.KERAS_FILE), features=True)
    return np.asarray(fn(images)[1], np.float64)


def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def numpy_prototypes(features, labels, nclass):
    return np.stack([unit(unit(features[labels == k]).sum(0, keepdims=True))[0] for k in range(nclass)])


def foreign_images(count, size=8, seed=0):
    """Uniform noise and black/white checkerboards: nothing like the toy classes' colours."""
    rng = np.random.RandomState(seed)
    noise = rng.randint(0, 256, (count // 2, size, size, 3)).astype(np.uint8)
    board = (np.indices((size, size)).sum(0) % 2 * 255).astype(np.uint8)
    boards = np.repeat(np.repeat(board[None, :, :, None], 3, 3), count - count // 2, 0)
    return np.concatenate([noise, boards])


def write_images(folder, images, prefix):
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{prefix}{i:02d}.png"))


def read_rows(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_foreign_images_score_as_more_outlying_and_the_flag_follows_the_threshold(finished_run, tmp_path, capsys):
    trainer, _ = finished_run
    folder = tmp_path / "images"
    inside, _ = toy_images(12, 3, size=8, seed=7)
    write_images(str(folder), inside, "in")
    write_images(str(folder), foreign_images(12), "out")
    output = tmp_path / "p.csv"
    assert predict.main(["predict", f"--model={trainer.export_dir}", str(folder), "--noprogress",
                         f"--output={output}"]) == 0
    err = capsys.readouterr().err
    reference = ood_reference.read(trainer.export_dir)
    assert f"ood = out above {reference.threshold:.4f}, the score below which 95 % of the" in err
    rows = read_rows(output)
    assert list(rows[0])[-2:] == ["ood_score", "ood"]
    score = {r["path"]: float(r["ood_score"]) for r in rows}
    ins = [score[f"in{i:02d}.png"] for i in range(12)]
    outs = [score[f"out{i:02d}.png"] for i in range(12)]
    assert np.median(outs) > np.max(ins), (ins, outs)
    for r in rows:
        assert r["ood"] == ("out" if float(r["ood_score"]) > reference.threshold else "in")
    assert {r["ood"] for r in rows if r["path"].startswith("out")} == {"out"}
    # the column is the cosine distance of the plain model's features to the nearest prototype
    expected = 1 - (unit(plain_features(trainer.export_dir, inside)) @ reference.prototypes.T).max(1)
    np.testing.assert_allclose(ins, expected, atol=2e-6)
    assert f"ood: {sum(r['ood'] == 'out' for r in rows)} of 24 images above the threshold" in err


def test_the_threshold_is_the_95_percent_quantile_of_its_calibration_scores(finished_run, toy):
    """Export (8 validation images < 20): labeled images scored leave-one-out; with the minimum
    lowered: the labeled validation images. Both recomputed here from the exported model."""
    trainer, _ = finished_run
    labeled, labels = records.load_numpy(toy.label_path)
    f_labeled = plain_features(trainer.export_dir, labeled)
    stored = ood_reference.read(trainer.export_dir)
    assert stored.calibrated_on == "labeled_loo" and stored.n_calibration == 16
    loo = []
    for i in range(len(labeled)):           # the prototype of i's class without i, by hand
        others = np.arange(len(labeled)) != i
        protos = numpy_prototypes(f_labeled[others], labels[others], 3)
        loo.append(1 - (unit(f_labeled[i:i + 1]) @ protos.T).max())
    with np.load(os.path.join(trainer.export_dir, ood_reference.FILE), allow_pickle=False) as data:
        np.testing.assert_allclose(data["calibration_scores"], loo, atol=2e-5)
        scores = np.sort(data["calibration_scores"].astype(np.float64))
        assert float(data["threshold"]) == scores[15]       # ceil(0.95 * 16) = the 16th of 16
        np.testing.assert_allclose(data["prototypes"], numpy_prototypes(f_labeled, labels, 3), atol=2e-5)
        assert str(data["score"]) == "prototype_cosine_distance"

    valid = run_modes.ood_reference_of(trainer, min_valid=5)
    assert str(valid["calibrated_on"]) == "valid"
    first8, _ = records.load_numpy(toy.unlabel_path)
    expected = 1 - (unit(plain_features(trainer.export_dir, first8[:8]))
                    @ numpy_prototypes(f_labeled, labels, 3).T).max(1)
    np.testing.assert_allclose(valid["calibration_scores"], expected, atol=2e-5)
    assert float(valid["threshold"]) == pytest.approx(np.sort(expected)[7], abs=2e-5)   # 8th of 8


def test_build_leaves_out_unlabeled_validation_rows_and_needs_min_valid():
    rng = np.random.RandomState(0)
    labeled, labels = rng.randn(12, 4), np.arange(12) % 3
    valid, valid_labels = rng.randn(30, 4), np.r_[np.zeros(20, int), -np.ones(10, int)]
    ref = ood_reference.build(labeled, labels, valid, valid_labels, 3)
    protos = numpy_prototypes(labeled, labels, 3)
    expected = 1 - (unit(valid[:20]) @ protos.T).max(1)
    np.testing.assert_allclose(ref["calibration_scores"], expected, atol=1e-5)
    assert str(ref["calibrated_on"]) == "valid"
    assert float(ref["threshold"]) == np.sort(ref["calibration_scores"].astype(np.float64))[18]  # 19th of 20
    assert np.mean(expected <= ref["threshold"] + 1e-5) >= 0.95 > np.mean(expected < ref["threshold"] - 1e-5)
    ref = ood_reference.build(labeled, labels, valid, valid_labels, 3, min_valid=21)
    assert str(ref["calibrated_on"]) == "labeled_loo" and len(ref["calibration_scores"]) == 12
    ref = ood_reference.build(labeled, labels, np.zeros([0, 0]), np.zeros([0]), 3)
    assert str(ref["calibrated_on"]) == "labeled_loo"


def test_an_export_without_the_reference_still_predicts_without_the_columns(finished_run, tmp_path, capsys):
    trainer, _ = finished_run
    old = tmp_path / "old_export"
    shutil.copytree(trainer.export_dir, old)
    os.remove(old / ood_reference.FILE)
    write_images(str(tmp_path / "images"), toy_images(3, 3, size=8, seed=7)[0], "in")
    output = tmp_path / "p.csv"
    assert predict.main(["predict", f"--model={old}", str(tmp_path / "images"), "--noprogress",
                         f"--output={output}"]) == 0
    err = capsys.readouterr().err
    assert err.count("info:") == 1 and f"has no {ood_reference.FILE} (an export written before it)" in err
    assert list(read_rows(output)[0]) == ["path", "class", "class_name", "confidence",
                                          "p_class0", "p_class1", "p_class2"]


def test_a_damaged_or_pickled_reference_is_one_line_and_never_unpickled(finished_run, tmp_path):
    trainer, _ = finished_run
    folder = tmp_path / "export"
    shutil.copytree(trainer.export_dir, folder)
    path = folder / ood_reference.FILE
    path.write_bytes(b"not a zip")
    with pytest.raises(UserError, match=r"unreadable .*ood_reference\.npz .*re-export the run"):
        predict.Predictor(str(folder))
    with open(path, "wb") as f:
        np.savez(f, prototypes=np.array([{"x": 1}], dtype=object), threshold=np.float64(0.5))
    with pytest.raises(UserError, match=r"unreadable .*ood_reference\.npz \(.*allow_pickle"):
        predict.Predictor(str(folder))
    with open(path, "wb") as f:
        np.savez(f, prototypes=np.zeros([5, 4], np.float32), calibration_scores=np.zeros(3),
                 threshold=np.float64(0.5), quantile=np.float64(0.95), calibrated_on=np.array("valid"))
    with pytest.raises(UserError, match=r"malformed .*\(prototypes of shape \(5, 4\) for 3 classes\)"):
        predict.Predictor(str(folder))
