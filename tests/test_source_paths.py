"""Records point back to the user's files (issue 24 item 7): `create_datasets custom` keeps each
image's source path (feature `source`), create_split carries it into the split files,
check_split and outliers report it; records without it read as before."""
import json
import os
import shutil

import numpy as np
import tensorflow as tf

from data_prep import check_split, create_split
from data_prep import create_datasets as cd
from libml.data import images as image_files
from libml.data import records
from tests import fixtures_archives as fx


def make_custom(tmp_path, leak=True):
    """A 2-class image folder set (8 labeled, 4 test, 5 unlabeled; with `leak`, the last
    unlabeled image is a copy of a test image) written as dataset `pets`."""
    src, root = tmp_path / "src", tmp_path / "data"
    fx.write_image_folders(str(src / "labeled"), {"cat": 4, "dog": 4}, shape=(12, 12, 3))
    fx.write_image_folders(str(src / "test"), {"cat": 2, "dog": 2}, shape=(12, 12, 3), seed=10)
    for i, image in enumerate(fx.random_images(4, (12, 12, 3), seed=20)):
        fx.write_image(str(src / "unlabeled" / "deep" / f"u{i}.png"), image)
    if leak:
        shutil.copy(src / "test" / "dog" / "001.png", src / "unlabeled" / "copy_of_test.png")
    cd.main(["create_datasets", "custom", "--name=pets", f"--labeled_dir={src / 'labeled'}",
             f"--unlabeled_dir={src / 'unlabeled'}", f"--test_dir={src / 'test'}", "--size=8",
             f"--data_dir={root}"])
    return src, root


def test_custom_records_keep_their_source_path_and_read_as_before(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # relative folders given: absolute paths recorded
    fx.write_image_folders("src/labeled", {"cat": 2, "dog": 2}, shape=(12, 12, 3))
    fx.write_image_folders("src/test", {"cat": 1, "dog": 1}, shape=(12, 12, 3), seed=3)
    cd.main(["create_datasets", "custom", "--name=rel", "--labeled_dir=src/labeled",
             "--test_dir=src/test", "--size=8", "--data_dir=data"])
    train = "data/rel-train.tfrecord"
    expected = [str(tmp_path / "src" / "labeled" / c / f"{i:03d}.png") for c in ("cat", "dog") for i in range(2)]
    assert records.load_sources(train) == expected
    # every pixel is the file's, as images.load_images reads it; labels as before
    arrays, labels = records.load_numpy(train)
    files, _, _ = image_files.load_images(expected, 8, None, False, 1)
    np.testing.assert_array_equal(arrays, np.stack(files))
    assert labels.tolist() == [0, 0, 1, 1]
    # the readers that name image and label (the batched parse of the training pipeline)
    parsed = tf.io.parse_example(list(records.iterate_serialized(train)), records.FEATURES)
    assert sorted(parsed) == ["image", "label"] and parsed["label"].numpy().tolist() == [0, 0, 1, 1]
    # relabel keeps the path; records without one read as ""
    again = records.relabel(next(iter(records.iterate_serialized(train))), 5)
    assert tf.train.Example.FromString(again).features.feature["source"].bytes_list.value[0].decode() == expected[0]
    records.write_images(str(tmp_path / "plain.tfrecord"), arrays[:2], labels[:2])
    assert records.load_sources([str(tmp_path / "plain.tfrecord"), train]) == ["", ""] + expected
    # --norecord_sources: the same records without the paths
    cd.main(["create_datasets", "custom", "--name=rel", "--labeled_dir=src/labeled", "--test_dir=src/test",
             "--size=8", "--data_dir=data", "--overwrite", "--norecord_sources"])
    assert records.load_sources(train) == [""] * 4
    np.testing.assert_array_equal(records.load_numpy(train)[0], arrays)


def test_split_files_carry_the_source_path_of_every_record(tmp_path):
    src, root = make_custom(tmp_path)
    inputs = [str(root / "pets-train.tfrecord"), str(root / "pets-unlabeled.tfrecord")]
    paths = create_split.create_split(str(root / "SSL" / "pets"), inputs, size=4, seed=2)
    everything = records.load_sources(inputs)
    assert everything[8:] == sorted(everything[8:]) and everything[-1].endswith("unlabeled/deep/u3.png")
    with open(paths["map"]) as f:
        split = json.load(f)
    assert records.load_sources(paths["label"]) == [everything[i] for i in split["label"]]
    assert records.load_sources(paths["unlabel"]) == [everything[i] for i in split["unlabel"]]
    # and each split record is the image of the file it names
    unlabel_images, _ = records.load_numpy(paths["unlabel"])
    named = records.load_sources(paths["unlabel"])
    files, _, _ = image_files.load_images(named, 8, 3, False, 1)
    np.testing.assert_array_equal(unlabel_images, np.stack(files))


def test_check_split_names_the_files_of_a_leak(tmp_path, capsys):
    src, root = make_custom(tmp_path)
    create_split.create_split(str(root / "SSL" / "pets"), [str(root / "pets-train.tfrecord"),
                                                          str(root / "pets-unlabeled.tfrecord")], 4, seed=2)
    assert check_split.main(["check_split", "--dataset=pets.2@4-2", f"--data_dir={root}"]) == 1
    out = capsys.readouterr().out
    test_file = src / "test" / "dog" / "001.png"
    copy = src / "unlabeled" / "copy_of_test.png"
    assert "LEAK: 1 images of test in unlabeled (positions in the first set: 3)" in out
    position = records.load_sources(str(root / "SSL" / "pets.2@4-unlabel.tfrecord")).index(str(copy)) - 2
    assert f"  test #3 {test_file} = unlabeled #{position} {copy}" in out

