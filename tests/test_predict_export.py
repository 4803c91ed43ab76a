"""Exports (.keras, SavedModel) predict what the in-memory EMA model predicts; the predict
command writes one CSV row per image; --export_only re-exports a run."""
import csv
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from libml.export import saving
from libml.data import records
from libml.base.errors import UserError
from realmix_tf import predict
from tests.fixtures_data import toy_images
from tests.test_train import finished_run, make_trainer, tiny_config, toy  # noqa: F401 (fixtures)


@pytest.fixture(scope="module")
def images():
    return toy_images(12, 3, size=8, seed=7)[0]


def ema_probs(trainer, images):
    return trainer.model.classify(saving.normalize(images), ema=True).numpy()


def test_export_folder_contents(finished_run):
    trainer, _ = finished_run
    assert sorted(os.listdir(trainer.export_dir)) == ["meta.json", "model.keras", "ood_reference.npz",
                                                      "saved_model"]
    meta = predict.Predictor(trainer.export_dir).meta
    assert meta["step"] == 128 and meta["nclass"] == 3 and meta["height"] == 8
    assert meta["class_names"] == ["class0", "class1", "class2"]


def test_keras_export_is_plain_keras_and_predicts_like_the_ema_model(finished_run, images, tmp_path):
    """model.keras loads with keras.models.load_model in a fresh Python that cannot import this
    project (isolated mode, no PYTHONPATH, and its packages blocked: `pip install -e .` makes
    them importable from anywhere) and predicts what the in-memory EMA model predicts."""
    trainer, _ = finished_run
    path = os.path.join(trainer.export_dir, saving.KERAS_FILE)
    np.save(tmp_path / "images.npy", images)
    script = textwrap.dedent(f"""
        import importlib.abc, sys
        PROJECT = ("libml", "realmix_tf", "data_prep", "runs", "tests")

        class Blocked(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in PROJECT:
                    raise ModuleNotFoundError(f"the project's {{name}} was imported")
                return None

        sys.meta_path.insert(0, Blocked())
        import numpy as np, keras
        model = keras.models.load_model({path!r})
        assert not [m for m in sys.modules if m.split(".")[0] in PROJECT]
        np.save({str(tmp_path / 'out.npy')!r}, model.predict(np.load({str(tmp_path / 'images.npy')!r}), verbose=0))
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    result = subprocess.run([sys.executable, "-I", "-c", script], cwd=str(tmp_path), env=env,
                            capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr[-2000:]
    probs = np.load(tmp_path / "out.npy")
    np.testing.assert_allclose(probs, ema_probs(trainer, images), rtol=0, atol=2e-6)
    raw = trainer.model.classify(saving.normalize(images), ema=False).numpy()
    assert not np.allclose(raw, probs, atol=1e-6)     # it is the EMA net, not the raw one


def test_saved_model_predicts_like_the_ema_model(finished_run, images):
    trainer, _ = finished_run
    loaded = tf.saved_model.load(os.path.join(trainer.export_dir, saving.SAVED_MODEL_DIR))
    out = loaded.signatures["serving_default"](images=tf.constant(images))
    np.testing.assert_allclose(out["probabilities"].numpy(), ema_probs(trainer, images), atol=1e-6)
    np.testing.assert_array_equal(out["class"].numpy(), ema_probs(trainer, images).argmax(-1))


def write_folder(folder, images):
    os.makedirs(os.path.join(folder, "sub"), exist_ok=True)
    paths = []
    for i, image in enumerate(images):
        name = f"sub/img{i:02d}.jpg" if i == 0 else f"img{i:02d}.png"
        Image.fromarray(image).save(os.path.join(folder, name), quality=100)
        paths.append(name)
    Image.fromarray(np.repeat(np.repeat(images[1], 2, 0), 2, 1)).save(os.path.join(folder, "big.png"))
    return paths


def test_predict_command_writes_one_row_per_image(finished_run, images, tmp_path):
    trainer, _ = finished_run
    folder, output = tmp_path / "images", tmp_path / "out.csv"
    write_folder(str(folder), images)
    assert predict.main(["predict", f"--model={trainer.run_dir}", f"--images={folder}",
                         f"--output={output}", "--batch=5"]) == 0
    with open(output) as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 13
    assert list(rows[0]) == ["path", "class", "class_name", "confidence", "p_class0", "p_class1", "p_class2",
                             "ood_score", "ood"]
    by_path = {r["path"]: r for r in rows}
    expected = ema_probs(trainer, images)
    for i in range(1, 12):                       # lossless PNGs: exactly the EMA model's output
        row = by_path[f"img{i:02d}.png"]
        probs = [float(row[f"p_class{k}"]) for k in range(3)]
        np.testing.assert_allclose(probs, expected[i], atol=2e-6)
        assert int(row["class"]) == expected[i].argmax() and row["class_name"] == f"class{expected[i].argmax()}"
        assert float(row["confidence"]) == pytest.approx(expected[i].max(), abs=2e-6)
    assert "sub/img00.jpg" in by_path and "big.png" in by_path     # JPEG and a resized image

    with pytest.raises(UserError, match="already exists"):
        predict.main(["predict", f"--model={trainer.export_dir}", f"--images={folder}", f"--output={output}"])
    saved_model = os.path.join(trainer.export_dir, saving.SAVED_MODEL_DIR)
    assert predict.main(["predict", f"--model={saved_model}", f"--images={folder}",
                         f"--output={output}", "--overwrite"]) == 0
    with open(output) as f:
        again = {r["path"]: r for r in csv.DictReader(f)}
    assert again["img03.png"]["class"] == by_path["img03.png"]["class"]


def test_predict_errors(finished_run, tmp_path):
    trainer, _ = finished_run
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(UserError, match="no images"):
        predict.main(["predict", f"--model={trainer.export_dir}", f"--images={empty}",
                      f"--output={tmp_path / 'o.csv'}"])
    with pytest.raises(UserError, match="no such file, folder or matching file"):
        predict.main(["predict", f"--model={trainer.export_dir}", f"--images={tmp_path / 'nope'}"])
    with pytest.raises(UserError, match="not found"):
        predict.main(["predict", f"--model={tmp_path / 'nope'}", f"--images={empty}"])
    (empty / "broken.png").write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"unreadable image .*broken\.png \(UnidentifiedImageError.*"
                                        r"--skip_bad_images"):
        predict.main(["predict", f"--model={trainer.export_dir}", f"--images={empty}",
                      f"--output={tmp_path / 'o.csv'}"])
    assert not os.path.exists(tmp_path / "o.csv")
    with pytest.raises(UserError, match="no image could be read"):
        predict.main(["predict", f"--model={trainer.export_dir}", str(empty), "--skip_bad_images",
                      f"--output={tmp_path / 'o.csv'}"])


def test_export_only_re_exports_the_newest_checkpoint(finished_run, toy, tmp_path):  # noqa: F811
    trainer, _ = finished_run
    stamp = os.path.getmtime(os.path.join(trainer.export_dir, saving.KERAS_FILE))
    config = tiny_config(toy, trainer.config.train_dir, export_only=True)
    paths = make_trainer(config).run()
    assert os.path.getmtime(paths["keras"]) > stamp
    assert predict.Predictor(trainer.export_dir).meta["step"] == 128
    with pytest.raises(UserError, match="no complete checkpoint"):
        make_trainer(tiny_config(toy, tmp_path, export_only=True)).run()


def awkward_images(folder):
    """Non-square, EXIF-rotated, RGBA, grayscale, 16-bit, CMYK and palette images."""
    rng = np.random.RandomState(3)
    os.makedirs(folder, exist_ok=True)
    wide = rng.randint(0, 256, (32, 64, 3)).astype(np.uint8)
    Image.fromarray(wide).save(os.path.join(folder, "a_wide.png"))
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(rng.randint(0, 256, (20, 44, 3)).astype(np.uint8)).save(
        os.path.join(folder, "b_rotated.png"), exif=exif)
    Image.fromarray(rng.randint(0, 256, (24, 18, 4)).astype(np.uint8), "RGBA").save(
        os.path.join(folder, "c_rgba.png"))
    Image.fromarray(rng.randint(0, 256, (15, 27)).astype(np.uint8)).save(os.path.join(folder, "d_gray.bmp"))
    Image.fromarray(rng.randint(0, 65536, (30, 17)).astype(np.uint16)).save(os.path.join(folder, "e_16bit.png"))
    Image.fromarray(wide).convert("CMYK").save(os.path.join(folder, "f_cmyk.jpg"))
    Image.fromarray(wide).convert("P").save(os.path.join(folder, "g_palette.gif"))
    return sorted(os.listdir(folder))


def test_predict_sees_exactly_what_training_saw(finished_run, tmp_path, monkeypatch):
    """The same files through create_datasets custom (records) and through predict (the arrays
    handed to the model) give identical uint8 arrays."""
    from data_prep import create_datasets
    trainer, _ = finished_run
    src, data = tmp_path / "src", tmp_path / "data"
    names = awkward_images(str(src / "labeled" / "things"))
    awkward_images(str(src / "labeled" / "zothers"))     # a set needs 2 classes; this one sorts last
    awkward_images(str(src / "test" / "things"))
    create_datasets.main(["create_datasets", "custom", "--name=awkward", f"--labeled_dir={src / 'labeled'}",
                          f"--test_dir={src / 'test'}", "--size=8", f"--data_dir={data}"])
    trained_on, _ = records.load_numpy(str(data / "awkward-train.tfrecord"))
    trained_on = trained_on[:len(names)]                  # the "things" class
    assert trained_on.shape == (len(names), 8, 8, 3)

    seen = []
    original = predict.Predictor.outputs
    monkeypatch.setattr(predict.Predictor, "outputs", lambda self, x: (seen.append(x), original(self, x))[1])
    predict.main(["predict", f"--model={trainer.export_dir}", str(src / "labeled" / "things"),
                  f"--output={tmp_path / 'p.csv'}", "--batch=3"])
    np.testing.assert_array_equal(np.concatenate(seen), trained_on)
    with open(tmp_path / "p.csv") as f:
        assert [r["path"] for r in csv.DictReader(f)] == names


def test_predict_files_patterns_and_skipped_list(finished_run, images, tmp_path, capsys):
    trainer, _ = finished_run
    folder = tmp_path / "imgs"
    write_folder(str(folder), images)
    (folder / "bad.png").write_bytes(b"\x89PNG broken")
    (folder / "notes.txt").write_text("x")
    output = tmp_path / "p.csv"
    assert predict.main(["predict", f"--model={trainer.export_dir}", str(folder / "img03.png"),
                         f"--images={folder / 'img1*.png'}", str(folder), "--skip_bad_images",
                         "--noprogress", f"--output={output}"]) == 0
    err = capsys.readouterr().err.splitlines()
    assert "read 13 images; skipped 2: 1 not PNG, JPEG, BMP, GIF, WebP, TIFF (.txt 1), 1 unreadable" in err
    assert any(line.startswith(f"  unreadable {folder / 'bad.png'}: ") for line in err)
    with open(output) as f:
        rows = [r["path"] for r in csv.DictReader(f)]
    # --images first, then the positional arguments; each file once
    assert rows[:3] == [str(folder / "img10.png"), str(folder / "img11.png"), str(folder / "img03.png")]
    assert len(rows) == 13 and "img03.png" not in rows and "big.png" in rows
