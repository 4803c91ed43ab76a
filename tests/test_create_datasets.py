"""data_prep/create_datasets.py: archives in the real formats, mnist5k, image folders, errors."""
import gzip
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from data_prep import archives, image_folders
from data_prep import create_datasets as cd
from libml.data import datasets
from libml.data import records
from libml.base.errors import UserError
from libml.data.images import same_channels
from tests import fixtures_archives as fx


@pytest.fixture(scope="module")
def mnist5k_root(tmp_path_factory):
    return fx.mnist5k_data(tmp_path_factory)


@pytest.fixture(autouse=True)
def no_network_no_home(monkeypatch, tmp_path):
    """No tfds home with data and no network, so a test never reaches the internet."""
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path / "tfds_home"))
    monkeypatch.setattr(archives, "_online", lambda *a, **k: False)


def run_main(*args):
    return cd.main(["create_datasets"] + list(args))


def read_meta(root, name):
    with open(os.path.join(root, f"{name}-meta.json")) as f:
        return json.load(f)


@pytest.mark.parametrize("layout", ["python", "binary"])
def test_cifar10_archive_round_trip(tmp_path, layout):
    archives, out = tmp_path / "archives", tmp_path / "data"
    expected = fx.write_cifar_archive(str(archives), "cifar10", per_batch=4, n_test=6, layout=layout)
    run_main("cifar10", f"--archive_dir={archives}", f"--data_dir={out}")
    for subset in ("train", "test"):
        images, labels = records.load_numpy(str(out / f"cifar10-{subset}.tfrecord"))
        np.testing.assert_array_equal(images, expected[subset][0])   # data_batch_1..5 order, HWC
        np.testing.assert_array_equal(labels, expected[subset][1])
    meta = read_meta(out, "cifar10")
    assert meta == {"name": "cifar10", "nclass": 10, "height": 32, "width": 32, "channels": 3, "flip": True,
                    "class_names": list(datasets.CIFAR10_CLASSES)}


def test_cifar100_fine_labels_and_names_from_default_download_dir(tmp_path):
    out = tmp_path / "data"
    expected = fx.write_cifar_archive(str(out / "downloads"), "cifar100", per_batch=3, n_test=4)
    run_main("cifar100", f"--data_dir={out}")     # found in $data_dir/downloads
    images, labels = records.load_numpy(str(out / "cifar100-train.tfrecord"))
    np.testing.assert_array_equal(images, expected["train"][0])
    np.testing.assert_array_equal(labels, expected["train"][1])
    meta = read_meta(out, "cifar100")
    assert meta["nclass"] == 100 and meta["class_names"][:2] == ["fine0", "fine1"]


def test_svhn_mat_files_labels_minus_one_and_noextra_copy(tmp_path):
    archives, out = tmp_path / "manual", tmp_path / "data"
    expected = fx.write_svhn_mats(str(archives))
    run_main("svhn", f"--archive_dir={archives}", f"--data_dir={out}")
    for split in ("train", "test", "extra"):
        images, labels = records.load_numpy(str(out / f"svhn-{split}.tfrecord"))
        np.testing.assert_array_equal(images, expected[split][0])
        np.testing.assert_array_equal(labels, expected[split][1] - 1)   # digit 0 (y=10) -> 9, as the original
    with open(out / "svhn-test.tfrecord", "rb") as a, open(out / "svhn_noextra-test.tfrecord", "rb") as b:
        assert a.read() == b.read()
    meta = read_meta(out, "svhn")
    assert meta["flip"] is False and meta["class_names"][0] == "1" and meta["class_names"][9] == "0"
    # Records without a meta.json (e.g. made by the released code) get the same names.
    from libml.data import datasets
    for name in ("svhn", "svhn_noextra"):
        assert list(datasets.REGISTRY[name].class_names) == meta["class_names"]


def test_tfds_examples_restored_to_file_order():
    rng = np.random.RandomState(0)
    images = fx.random_images(6, (2, 2, 3))
    order = rng.permutation(6)
    examples = [{"id": f"train_{i:05d}".encode(), "image": images[i], "label": np.int64(i % 10)} for i in order]
    got_images, got_labels = archives.tfds_records_in_order(examples, "cifar10")
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, np.arange(6))
    svhn = [{"id": f"test_{i:06d}", "image": images[i], "label": np.int64(d)} for i, d in enumerate([0, 1, 9])]
    assert archives.tfds_records_in_order(svhn, "svhn")[1].tolist() == [9, 0, 8]   # tfds digit -> original y - 1


def test_offline_without_archive_names_file_and_folder(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(UserError) as e:
        run_main("cifar10", f"--data_dir={out}")
    message = str(e.value)
    assert "cifar-10-python.tar.gz" in message and str(out / "downloads") in message and "\n" not in message
    assert not (out / "cifar10-train.tfrecord").exists()


def test_corrupt_archive(tmp_path):
    archives = tmp_path / "a"
    fx.write_cifar_archive(str(archives), "cifar10", per_batch=2, n_test=2)
    path = archives / "cifar-10-python.tar.gz"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(UserError, match="corrupt archive .*cifar-10-python.tar.gz"):
        run_main("cifar10", f"--archive_dir={archives}", f"--data_dir={tmp_path / 'data'}")


def test_mnist5k_real_data(mnist5k_root):
    train_images, train_labels = records.load_numpy(os.path.join(mnist5k_root, "mnist5k-train.tfrecord"))
    test_images, test_labels = records.load_numpy(os.path.join(mnist5k_root, "mnist5k-test.tfrecord"))
    assert train_images.shape == (4000, 32, 32, 1) and test_images.shape == (1000, 32, 32, 1)
    assert np.bincount(test_labels).tolist() == [100] * 10 and np.bincount(train_labels).tolist() == [400] * 10
    # zero border of 2 pixels; the centre is the csv row (784 pixels then the label)
    assert train_images[:, :2].max() == 0 and train_images[:, :, -2:].max() == 0
    with gzip.open(archives.mnist5k_csv_path(), "rt") as f:
        rows = np.loadtxt(f, delimiter=",", dtype=np.int64)
    is_test = np.zeros(5000, bool)
    for c in range(10):
        is_test[np.flatnonzero(rows[:, 784] == c)[-100:]] = True
    np.testing.assert_array_equal(test_images[:, 2:30, 2:30, 0], rows[is_test, :784].reshape(-1, 28, 28))
    np.testing.assert_array_equal(train_labels, rows[~is_test, 784])
    assert read_meta(mnist5k_root, "mnist5k")["channels"] == 1


def test_custom_folders(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    fx.write_image_folders(str(src / "labeled"), {"dog": 3, "cat": 2}, shape=(40, 48, 3), ext=".png")
    fx.write_image_folders(str(src / "labeled"), {"cat": 1}, shape=(30, 30, 3), ext=".JPG", seed=5)
    fx.write_image_folders(str(src / "test"), {"cat": 2, "dog": 1}, shape=(20, 16, 3), ext=".jpeg")
    os.makedirs(src / "unlabeled")
    for i in range(4):
        fx.write_image(str(src / "unlabeled" / f"u{i}.png"), fx.random_images(1, (36, 36, 3), seed=i)[0])
    (src / "unlabeled" / "notes.txt").write_text("not an image")
    run_main("custom", "--name=pets", f"--labeled_dir={src / 'labeled'}", f"--unlabeled_dir={src / 'unlabeled'}",
             f"--test_dir={src / 'test'}", "--size=16", f"--data_dir={out}")
    images, labels = records.load_numpy(str(out / "pets-train.tfrecord"))
    assert images.shape == (6, 16, 16, 3)
    assert labels.tolist() == [0, 0, 0, 1, 1, 1]          # classes by sorted folder name: cat=0, dog=1
    u_images, u_labels = records.load_numpy(str(out / "pets-unlabeled.tfrecord"))
    assert u_images.shape == (4, 16, 16, 3) and u_labels.tolist() == [-1] * 4
    assert records.load_labels(str(out / "pets-test.tfrecord")).tolist() == [0, 0, 1]
    meta = read_meta(out, "pets")
    assert meta["class_names"] == ["cat", "dog"] and meta["nclass"] == 2 and meta["height"] == 16
    # resize of the shorter side then centre crop: a 40x48 image becomes the centre 40x40, scaled
    from PIL import Image
    first = np.asarray(Image.open(src / "labeled" / "dog" / "000.png"))
    expected = np.asarray(Image.fromarray(first).resize((19, 16), Image.BICUBIC).crop((1, 0, 17, 16)))
    np.testing.assert_array_equal(images[3], expected)


def test_custom_grayscale_kept_single_channel(tmp_path):
    src = tmp_path / "src"
    fx.write_image_folders(str(src / "l"), {"a": 2, "b": 2}, shape=(12, 12, 1))
    fx.write_image_folders(str(src / "t"), {"a": 1, "b": 1}, shape=(12, 12, 1))
    prepared = image_folders.load_custom("g", str(src / "l"), "", str(src / "t"), 8)
    assert prepared.subsets["train"][0].shape == (4, 8, 8, 1) and prepared.meta["channels"] == 1
    mixed, channels = same_channels([[np.zeros((2, 2, 1), np.uint8)], [np.ones((2, 2, 3), np.uint8)]])
    assert channels == 3 and mixed[0][0].shape == (2, 2, 3)       # one colour image: all RGB
    fx.write_image_folders(str(src / "t"), {"c": 1}, shape=(12, 12, 3))
    with pytest.raises(UserError, match="test class folder 'c'"):
        image_folders.load_custom("g", str(src / "l"), "", str(src / "t"), 8)


def test_custom_reads_every_format_nested_folders_and_reports_skips(tmp_path, capsys):
    """.bmp/.webp/.gif and nested unlabeled sub-folders are read; other files and unreadable
    images are counted and, with --skip_bad_images, listed instead of stopping."""
    from PIL import Image
    src, out = tmp_path / "src", tmp_path / "data"
    fx.write_image_folders(str(src / "l"), {"a": 1, "b": 1}, shape=(12, 12, 3))
    fx.write_image_folders(str(src / "t"), {"a": 1, "b": 1}, shape=(12, 12, 3))
    Image.new("L", (12, 12), 9).save(src / "l" / "a" / "gray.bmp")            # 8-bit grayscale BMP
    Image.new("RGB", (12, 12), (1, 2, 3)).save(src / "l" / "b" / "c.webp", lossless=True)
    os.makedirs(src / "u" / "2019" / "june")
    Image.new("RGB", (12, 12), (5, 5, 5)).save(src / "u" / "top.gif")
    Image.new("RGB", (12, 12), (6, 6, 6)).save(src / "u" / "2019" / "june" / "deep.png")
    (src / "u" / "2019" / "list.csv").write_text("x")
    (src / "l" / "README.txt").write_text("x")
    (src / "u" / "2019" / "cut.jpg").write_bytes(b"\xff\xd8 truncated")
    args = ["custom", "--name=fmt", f"--labeled_dir={src / 'l'}", f"--test_dir={src / 't'}",
            f"--unlabeled_dir={src / 'u'}", "--size=8", f"--data_dir={out}"]
    with pytest.raises(UserError, match=r"unreadable image .*cut\.jpg"):
        run_main(*args)
    capsys.readouterr()
    run_main(*args, "--skip_bad_images")
    lines = capsys.readouterr().out.splitlines()
    assert "read 4 train images; skipped 1: 1 outside the class folders" in lines
    assert "read 2 test images" in lines
    assert ("read 2 unlabeled images; skipped 2: 1 not PNG, JPEG, BMP, GIF, WebP, TIFF (.csv 1), "
            "1 unreadable") in lines
    assert any(line.startswith(f"  unreadable {src / 'u' / '2019' / 'cut.jpg'}: ") for line in lines)
    train_images, train_labels = records.load_numpy(str(out / "fmt-train.tfrecord"))
    assert train_labels.tolist() == [0, 0, 1, 1]
    assert np.all(train_images[1] == 9) and np.all(train_images[3] == [1, 2, 3])   # gray.bmp, c.webp
    unlabeled, _ = records.load_numpy(str(out / "fmt-unlabeled.tfrecord"))
    assert [int(u[0, 0, 0]) for u in unlabeled] == [6, 5]       # 2019/june/deep.png, top.gif


def test_custom_errors(tmp_path):
    src, out = tmp_path / "src", tmp_path / "data"
    fx.write_image_folders(str(src / "l"), {"a": 2, "b": 1})
    fx.write_image_folders(str(src / "t"), {"a": 1})
    args = ["custom", "--name=x", f"--labeled_dir={src / 'l'}", f"--test_dir={src / 't'}", "--size=8",
            f"--data_dir={out}"]
    os.makedirs(src / "l" / "empty")
    with pytest.raises(UserError, match="class folder .*empty has no PNG, JPEG, BMP, GIF, WebP, TIFF images"):
        run_main(*args)
    os.rmdir(src / "l" / "empty")
    (src / "l" / "b" / "broken.jpg").write_bytes(b"not a jpeg at all")
    with pytest.raises(UserError, match="unreadable image .*broken.jpg .*--skip_bad_images"):
        run_main(*args)
    assert not os.path.exists(out / "x-train.tfrecord")
    os.remove(src / "l" / "b" / "broken.jpg")
    with pytest.raises(UserError, match="--name"):
        run_main(*[a if a != "--name=x" else "--name=9bad-name" for a in args])
    with pytest.raises(UserError, match="no class sub-folders"):
        run_main(*[a if not a.startswith("--labeled_dir") else f"--labeled_dir={src / 'l' / 'a'}" for a in args])
    run_main(*args)
    before = (out / "x-train.tfrecord").read_bytes()
    with pytest.raises(UserError, match="x-train.tfrecord already exists: pass --overwrite"):
        run_main(*args)
    assert (out / "x-train.tfrecord").read_bytes() == before
    run_main(*args, "--overwrite")
    assert sorted(os.listdir(out)) == ["x-meta.json", "x-test.tfrecord", "x-train.tfrecord"]   # no temp files


def test_bad_dataset_names_and_flags(tmp_path):
    with pytest.raises(UserError, match="unknown dataset 'cifar11'"):
        run_main("cifar11", f"--data_dir={tmp_path}")
    with pytest.raises(UserError, match="name the datasets"):
        run_main(f"--data_dir={tmp_path}")
    with pytest.raises(UserError, match="see --help"):
        run_main("mnist5k", "--no_such_flag=1")


def test_exit_code_and_one_line_error(tmp_path):
    env = dict(os.environ, ML_DATA=str(tmp_path), TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-m", "data_prep.create_datasets", "cifar11"], env=env,
                          capture_output=True, text=True, cwd=os.path.dirname(os.path.dirname(__file__)))
    assert proc.returncode == 2
    assert [l for l in proc.stderr.splitlines() if l.startswith("error:")] == [
        "error: unknown dataset 'cifar11': choose from cifar10, cifar100, svhn, mnist5k, imagenet32, stl10, custom"]


def test_tfds_fallback_when_no_archive(tmp_path, monkeypatch):
    """No archive: tensorflow-datasets is used (mocked: no network, no real data)."""
    import tensorflow_datasets as tfds
    out = tmp_path / "data"
    with tfds.testing.mock_data(num_examples=5):
        with pytest.raises(UserError, match="no cifar10 data found and no network"):
            run_main("cifar10", f"--data_dir={out}", f"--tfds_data_dir={tmp_path / 'tfds'}")
        monkeypatch.setattr(archives, "_online", lambda *a, **k: True)
        with pytest.raises(UserError, match="no cifar10 data found"):
            run_main("cifar10", f"--data_dir={out}", f"--tfds_data_dir={tmp_path / 'tfds'}", "--nodownload")
        run_main("cifar10", f"--data_dir={out}", f"--tfds_data_dir={tmp_path / 'tfds'}")
    images, labels = records.load_numpy(str(out / "cifar10-train.tfrecord"))
    assert images.shape == (5, 32, 32, 3) and ((labels >= 0) & (labels < 10)).all()
    assert read_meta(out, "cifar10")["class_names"] == list(datasets.CIFAR10_CLASSES)


def test_imagenet32_offline_names_the_zip_files(tmp_path):
    out = tmp_path / "data"
    with pytest.raises(UserError) as e:
        run_main("imagenet32", f"--data_dir={out}", f"--tfds_data_dir={tmp_path / 'tfds'}")
    message = str(e.value)
    assert "Imagenet32_train_npz.zip and Imagenet32_val_npz.zip" in message
    assert str(out / "downloads") in message and "--archive_dir" in message and "\n" not in message
    assert not out.exists() or not any(out.iterdir())


def test_imagenet32_from_tfds_manual_files(tmp_path):
    """tensorflow-datasets imagenet_resized/32x32 (mocked) prepared from the manual zip files;
    train and validation (as -test) streamed to records, in tfds order, with the metadata."""
    import tensorflow_datasets as tfds
    archives, out, tfds_dir = tmp_path / "manual", tmp_path / "data", tmp_path / "tfds"
    os.makedirs(archives)
    for name in cd.IMAGENET32_FILES:
        (archives / name).write_bytes(b"zip placeholder: the mock never opens it")
    with tfds.testing.mock_data(num_examples=7):
        run_main("imagenet32", f"--archive_dir={archives}", f"--data_dir={out}",
                 f"--tfds_data_dir={tfds_dir}")
        builder = tfds.builder(cd.IMAGENET32_TFDS, data_dir=str(tfds_dir))
        expected = {subset: list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))
                    for subset, split in cd.IMAGENET32_SPLITS.items()}
    for subset in ("train", "test"):
        images, labels = records.load_numpy(str(out / f"imagenet32-{subset}.tfrecord"))
        assert images.shape == (7, 32, 32, 3)
        np.testing.assert_array_equal(images, np.stack([ex["image"] for ex in expected[subset]]))
        assert labels.tolist() == [int(ex["label"]) for ex in expected[subset]]
    meta = read_meta(out, "imagenet32")
    assert meta["nclass"] == 1000 and meta["flip"] is True and (meta["height"], meta["channels"]) == (32, 3)
    assert len(meta["class_names"]) == 1000 and meta["class_names"][0] == "n02119789"
    with pytest.raises(UserError, match="imagenet32-train.tfrecord already exists"):
        run_main("imagenet32", f"--archive_dir={archives}", f"--data_dir={out}")
    with pytest.raises(UserError, match="--name=imagenet32 is a built-in dataset"):
        run_main("custom", "--name=imagenet32", f"--labeled_dir={archives}", f"--test_dir={archives}",
                 f"--data_dir={out}")
