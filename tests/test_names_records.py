"""Dataset-name parser, file layout and record I/O (libml/data/names.py, libml/data/records.py)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from absl import flags

from libml.base import cli

from libml.base import errors

from libml.data import names

from libml.data import records
from libml.base.errors import UserError


@pytest.mark.parametrize("text, expected", [
    ("cifar10.3@250-5000", ("cifar10", 3, 250, 5000)),
    ("cifar10.250", ("cifar10", 1, 250, 1)),
    ("svhn_noextra.5@1000-1", ("svhn_noextra", 5, 1000, 1)),
    ("cifar6_mismatch75.1@2400-1", ("cifar6_mismatch75", 1, 2400, 1)),
    ("cifar10.0@4000-0", ("cifar10", 0, 4000, 0)),
    (" mnist5k.2@100-50 ", ("mnist5k", 2, 100, 50)),
])
def test_parse_dataset_name(text, expected):
    d = names.parse_dataset_name(text)
    assert (d.name, d.seed, d.nlabeled, d.nvalid) == expected


@pytest.mark.parametrize("text", [
    "", "cifar10", "cifar10.3@250", "cifar10@250-5000", "cifar10.3@-5000", "cifar10.a@250-1",
    "cifar-10.3@250-1", "3cifar.1@250-1", "cifar10.3@250-5000-1", "cifar10.3@0-1", "cifar10.0",
])
def test_parse_dataset_name_rejects(text):
    with pytest.raises(UserError) as e:
        names.parse_dataset_name(text)
    message = str(e.value)
    assert "\n" not in message
    assert "cifar10.3@250-5000" in message or "at least 1" in message


def test_file_layout_matches_libml():
    d = names.parse_dataset_name("cifar10.3@250-5000")
    assert str(d) == "cifar10.3@250-5000"
    assert d.label_path("/d") == "/d/SSL/cifar10.3@250-label.tfrecord"
    assert d.unlabel_path("/d") == "/d/SSL/cifar10.3@250-unlabel.tfrecord"
    assert d.map_path("/d") == "/d/SSL/cifar10.3@250-map.json"
    assert d.test_path("/d") == "/d/cifar10-test.tfrecord"
    assert d.train_path("/d") == "/d/cifar10-train.tfrecord"


def test_data_dir(monkeypatch):
    monkeypatch.delenv("ML_DATA", raising=False)
    with pytest.raises(UserError, match="ML_DATA"):
        names.data_dir("")
    assert names.data_dir("/x") == "/x"
    monkeypatch.setenv("ML_DATA", "/env")
    assert names.data_dir("") == "/env"
    assert names.data_dir("/flag") == "/flag"


def _images(n, shape=(8, 8, 3), seed=0):
    return np.random.RandomState(seed).randint(0, 256, size=(n,) + shape).astype(np.uint8)


def test_record_round_trip_matches_original_format(tmp_path):
    images, labels = _images(20), np.arange(20) % 3
    path = str(tmp_path / "x.tfrecord")
    pngs = list(records.encode_png_images(images))
    assert records.write_records(path, zip(pngs, labels)) == 20
    got_images, got_labels = records.load_numpy(path)
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_labels, labels)
    np.testing.assert_array_equal(records.load_labels(path), labels)
    # The schema is exactly tf.train.Example{image: bytes PNG, label: int64}.
    first = next(iter(tf.data.TFRecordDataset(path))).numpy()
    example = tf.train.Example.FromString(first)
    assert set(example.features.feature) == {"image", "label"}
    assert example.features.feature["image"].bytes_list.value[0][:8] == b"\x89PNG\r\n\x1a\n"
    assert example.features.feature["label"].int64_list.value[0] == 0


def test_write_refuses_existing_file_and_keeps_it(tmp_path):
    path = tmp_path / "x.tfrecord"
    path.write_bytes(b"precious")
    with pytest.raises(UserError, match="--overwrite"):
        records.write_records(str(path), [(b"png", 1)])
    assert path.read_bytes() == b"precious"
    records.write_records(str(path), [(b"png", 1)], overwrite=True)
    assert path.read_bytes() != b"precious"


def test_failed_write_leaves_no_file(tmp_path):
    path = tmp_path / "x.tfrecord"

    def examples():
        yield b"png", 1
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        records.write_records(str(path), examples())
    assert os.listdir(tmp_path) == []


def test_corrupt_record_names_the_file(tmp_path):
    path = str(tmp_path / "bad.tfrecord")
    records.write_records(path, zip(records.encode_png_images(_images(5)), range(5)))
    data = bytearray(open(path, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(path, "wb").write(bytes(data))
    with pytest.raises(UserError, match="corrupt TFRecord .*bad.tfrecord"):
        records.load_numpy(path)
    with pytest.raises(UserError, match="bad.tfrecord"):
        list(records.iterate_serialized(path))


def test_require_file_names_command(tmp_path):
    missing = str(tmp_path / "nothing.tfrecord")
    with pytest.raises(UserError) as e:
        records.require_file(missing, "python -m data_prep.create_datasets cifar10")
    assert missing in str(e.value) and "create_datasets cifar10" in str(e.value)


def test_cli_run_prints_one_line_and_exits_2(capsys):
    def main(argv):
        raise UserError("bad thing: do this instead")

    with pytest.raises(SystemExit) as e:
        cli.run(main, flags.FlagValues(), [])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err == "error: bad thing: do this instead\n"


def test_cli_parse_one_line_flag_error_and_result_exit_codes(capsys):
    fv = flags.FlagValues()
    flags.DEFINE_integer("size", 3, "A size.", flag_values=fv)
    assert cli.parse(fv, ["prog", "--size=5", "pos"]) == ["pos"] and fv.size == 5
    assert cli.parse(fv, ["prog"]) == [] and fv.size == 3         # defaults restored on re-parse
    with pytest.raises(UserError, match="see --help for the flags"):
        cli.parse(fv, ["prog", "--size=x"])
    for result, code in ((None, 0), ({"last20": 1.0}, 0), (1, 1)):
        with pytest.raises(SystemExit) as e:
            cli.run(lambda argv, r=result: r, fv, ["prog"])
        assert e.value.code == code


def test_first_line_is_one_bounded_line():
    assert errors.first_line(ValueError("one\ntwo")) == "one"
    assert errors.first_line(ValueError("x" * 500)) == "x" * 200
    assert errors.first_line(KeyError()) == "KeyError"


def test_io_json_atomic_refuses_existing_and_reads_back(tmp_path):
    from libml.base import files
    path = str(tmp_path / "sub" / "a.json")
    files.write_json(path, {"b": np.float32(0.5), "a": np.int64(3)})
    assert open(path).read() == '{\n  "a": 3,\n  "b": 0.5\n}\n'
    with pytest.raises(UserError, match="already exists: pass --overwrite"):
        files.write_json(path, {"a": 1})
    assert files.read_json(path, "fix it") == {"a": 3, "b": 0.5}          # refused write left it whole
    files.write_json(path, {"a": 1}, overwrite=True)
    assert files.read_json(path, "fix it") == {"a": 1}
    assert os.listdir(tmp_path / "sub") == ["a.json"]                   # no temp file left
    open(path, "w").write("{half")
    with pytest.raises(UserError, match=r"unreadable .*a.json .*: fix it"):
        files.read_json(path, "fix it")
    with pytest.raises(RuntimeError):
        with files.atomic_path(str(tmp_path / "b.bin")) as tmp:
            open(tmp, "w").write("partial")
            raise RuntimeError("writer died")
    assert not os.path.exists(tmp_path / "b.bin") and os.listdir(tmp_path) == ["sub"]
    assert files.progress([1, 2]) == [1, 2] and files.progress(total=3) is None   # no desc, no bar


def test_the_one_encoder_is_deterministic_protobuf():
    from tensorflow.core.example import example_pb2
    # Worked bytes of {image: b"x", label: 2}: Example.features{feature map entries in key order}.
    assert records.serialize_example(b"x", 2) == bytes.fromhex(
        "0a20" "0a0e" "0a05696d616765" "1205" "0a030a0178" "0a0e" "0a056c6162656c" "1205" "1a030a0102")
    for png, label in [(b"", 0), (b"\x89PNG" * 100, 7), (bytes(range(256)) * 3, -1), (b"x", 2 ** 40)]:
        raw = records.serialize_example(png, label)
        example = example_pb2.Example()
        example.ParseFromString(raw)
        assert raw == example.SerializeToString(deterministic=True)
        parsed = records.parse_example(tf.constant(raw))
        assert parsed["image"].numpy() == png and parsed["label"].numpy() == label
        assert records.relabel(raw, 3) == records.serialize_example(png, 3)


def test_paths_and_creating_commands(monkeypatch):
    monkeypatch.setenv("ML_DATA", "/data")
    assert names.split_paths("/data/SSL/cifar10", 3, 250) == {
        "label": "/data/SSL/cifar10.3@250-label.tfrecord",
        "unlabel": "/data/SSL/cifar10.3@250-unlabel.tfrecord", "map": "/data/SSL/cifar10.3@250-map.json"}
    d = names.parse_dataset_name("cifar10.3@250-5000")
    assert d.label_path("/data") == names.split_paths(names.ssl_prefix("/data", "cifar10"), 3, 250)["label"]
    assert names.meta_path("/data", "pets") == "/data/pets-meta.json"
    assert names.extend_dir(d, "/data", 50, "erase", 0) == "/data/SSL/extend/cifar10.3@250-5000/erase50-seed0"
    assert names.create_split_command(d, "/data") == (
        "python -m data_prep.create_split --seed=3 --size=250 /data/SSL/cifar10 /data/cifar10-train.tfrecord")
    assert names.create_split_command("cifar6_mismatch50.2@2400-1", "/data") == (
        "python -m data_prep.create_mismatch --source=cifar10 --mismatch=50 --seed=2")
    assert names.create_dataset_command("svhn_noextra", "/data") == "python -m data_prep.create_datasets svhn"
    assert names.create_dataset_command("imagenet32", "/other") == (
        "python -m data_prep.create_datasets imagenet32 --data_dir=/other")
    assert names.create_dataset_command("pets", "/data").startswith(
        "python -m data_prep.create_datasets custom --name=pets ")
    assert names.extend_command(d) == ("python -m data_prep.extend_unlabeled --dataset=cifar10.3@250-5000 "
                                       "--copies=K --aug=AUG --seed=S")
