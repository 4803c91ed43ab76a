"""Hostile but realistic inputs (issue 25): nothing a user's file contains runs, nothing grows
without bound, and each bad input ends in one line.

Beside tests/test_faults.py (issue 14's faults of a long run); the same standards: every test
here failed before its fix.
"""
import csv
import io as python_io
import json
import os
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from libml.base.errors import UserError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ---------------------------------------------------------------------------------------------
# CIFAR archives: a pickle runs nothing

class _Exploit:
    """Pickles to a call of os.system, as a crafted archive would."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def _write_archive(path, members):
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(data)
            tar.addfile(info, python_io.BytesIO(data))


def _cifar_members(batch_of):
    rows = np.zeros([2, 3072], np.uint8)
    good = {b"batch_label": b"x", b"data": rows, b"labels": [1, 2], b"filenames": [b"a", b"b"]}
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    return {n: pickle.dumps(batch_of(n, dict(good)), protocol=2) for n in names}


def _read(path):
    from data_prep import archives
    return archives.read_cifar_archive(str(path), "python", "cifar10")


def test_a_crafted_cifar_archive_runs_nothing_and_is_one_line(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_archive(path, _cifar_members(
        lambda n, b: {**b, b"data": _Exploit(f"touch {marker}")} if n == "data_batch_3" else b))
    with pytest.raises(UserError) as e:
        _read(path)
    assert not marker.exists()
    message = str(e.value)
    assert "data_batch_3 is not a CIFAR batch (it names posix.system" in message
    assert "nothing in it was run" in message and "\n" not in message


@pytest.mark.parametrize("payload, reason", [
    (lambda b: [b[b"data"]], "it pickles a list, not a dict"),
    (lambda b: {**b, b"data": "text"}, "b'data' is a str, not an array of N x 3072"),
    (lambda b: {**b, b"labels": [1]}, "'labels' is a list, not 2 labels"),
    (lambda b: {**b, b"data": np.zeros([2, 3072], object)}, "dtype('O') is not part of"),
    (lambda b: {**b, b"data": np.zeros([2, 5], np.uint8)}, "shape (2, 5)"),
])
def test_a_cifar_batch_of_the_wrong_type_is_one_line(tmp_path, payload, reason):
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_archive(path, _cifar_members(lambda n, b: payload(b) if n == "test_batch" else b))
    with pytest.raises(UserError) as e:
        _read(path)
    assert f"{path}: test_batch is not a CIFAR batch" in str(e.value)
    assert reason in str(e.value), str(e.value)


def test_labels_outside_the_classes_are_refused(tmp_path):
    path = tmp_path / "cifar-10-python.tar.gz"
    _write_archive(path, _cifar_members(lambda n, b: {**b, b"labels": [1, 10]}))
    with pytest.raises(UserError, match=r"labels outside 0\.\.9"):
        _read(path)


def test_real_cifar_pickles_of_numpy_1_and_2_still_read(tmp_path):
    from data_prep import cifar_pickle
    rows = np.arange(2 * 3072, dtype=np.int64).reshape(2, 3072) % 256
    batch = {b"data": rows.astype(np.uint8), b"labels": [3, 4]}
    data = pickle.dumps(batch, protocol=2)
    numpy1 = data.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")   # older writers
    for blob in (data, numpy1):
        got_rows, labels = cifar_pickle.load_batch(blob, "labels", "x")
        np.testing.assert_array_equal(got_rows, rows)
        assert labels.tolist() == [3, 4] and labels.dtype == np.int64
    # Python 2's cPickle (the original archives) stores bytes as strings read with encoding=bytes
    py2 = (b"\x80\x02}q\x00(U\x04dataq\x01cnumpy.core.multiarray\n_reconstruct\nq\x02cnumpy\n"
           b"ndarray\nq\x03K\x00\x85U\x01b\x87Rq\x04(K\x01K\x01M\x00\x0c\x86cnumpy\ndtype\nq\x05"
           b"U\x02u1K\x00K\x01\x87Rq\x06(K\x03U\x01|NNNJ\xff\xff\xff\xffJ\xff\xff\xff\xffK\x00tb"
           b"\x89T\x00\x0c\x00\x00" + bytes(range(256)) * 12 + b"tbU\x06labelsq\x07]q\x08K\x05au.")
    got_rows, labels = cifar_pickle.load_batch(py2, "labels", "x")
    assert got_rows.shape == (1, 3072) and got_rows[0, :256].tolist() == list(range(256))
    assert labels.tolist() == [5]


# ---------------------------------------------------------------------------------------------
# predict: a model runs nothing of its own; meta.json checked; the CSV holds no formula

@pytest.fixture(scope="module")
def export_dir(tmp_path_factory):
    """A real export (tiny run of tests.test_train's settings), copied so tests may edit it."""
    import shutil
    from tests.fixtures_data import make_ssl_dataset
    from tests.test_train import make_trainer, tiny_config
    toy = make_ssl_dataset(tmp_path_factory.mktemp("data"), nlabeled=16, nunlabeled=48, nvalid=8,
                           ntest=16, size=8)
    trainer = make_trainer(tiny_config(toy, tmp_path_factory.mktemp("runs"), train_kimg=0.03125))
    trainer.run()
    copy = tmp_path_factory.mktemp("export") / "export"
    shutil.copytree(trainer.export_dir, copy)
    return copy


def export_copy(export_dir, tmp_path, keep=("model.keras", "saved_model", "meta.json")):
    import shutil
    folder = tmp_path / "export"
    folder.mkdir(parents=True)
    for name in keep:
        source = export_dir / name
        (shutil.copytree if source.is_dir() else shutil.copy)(source, folder / name)
    return folder


def image_folder(tmp_path, names=("a.png", "b.png")):
    from PIL import Image
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    for i, name in enumerate(names):
        Image.fromarray(np.full([8, 8, 3], 40 * i, np.uint8)).save(folder / name)
    return folder


class _WritesAFile:
    """A SavedModel with the export's signature whose serving function writes a file."""

    def __init__(self, marker):
        import tensorflow as tf

        class Module(tf.Module):
            @tf.function(input_signature=[tf.TensorSpec([None, 8, 8, 3], tf.uint8, name="images")])
            def serve(self, images):
                with tf.control_dependencies([tf.io.write_file(marker, "owned")]):
                    probs = tf.nn.softmax(tf.zeros([tf.shape(images)[0], 3]))
                return {"probabilities": probs, "class": tf.argmax(probs, -1),
                        "confidence": tf.reduce_max(probs, -1)}

        self.module = Module()

    def save(self, folder):
        import tensorflow as tf
        tf.saved_model.save(self.module, str(folder), signatures={"serving_default": self.module.serve})


def test_a_saved_model_that_writes_a_file_is_refused_before_it_runs(export_dir, tmp_path):
    from realmix_tf import predict
    marker = tmp_path / "owned.txt"
    folder = tmp_path / "crafted"
    _WritesAFile(str(marker)).save(folder)
    json.dump({"height": 8, "width": 8, "channels": 3, "nclass": 3}, open(tmp_path / "meta.json", "w"))
    with pytest.raises(UserError) as e:
        predict.predict_files(str(folder), [str(image_folder(tmp_path))], str(tmp_path / "out.csv"),
                              show_progress=False)
    assert "is not a SavedModel written by this project's export (op WriteFile in function" in str(e.value)
    assert "nothing in it ran" in str(e.value)
    assert not marker.exists() and not (tmp_path / "out.csv").exists()


def test_the_export_saved_model_alone_passes_the_check_and_beside_a_keras_file_yields_to_it(
        export_dir, tmp_path):
    from libml.export import saved_model_check
    from realmix_tf import predict
    assert saved_model_check.check(str(export_dir / "saved_model"), (8, 8, 3), 3) == ((8, 8, 3), 3)
    alone = export_copy(export_dir, tmp_path, keep=("saved_model", "meta.json"))
    predictor = predict.Predictor(str(alone / "saved_model"))
    assert predictor.path == str(alone / "saved_model") and predictor.shape == (8, 8, 3)
    assert predictor(np.zeros([2, 8, 8, 3], np.uint8)).shape == (2, 3)
    assert predict.Predictor(str(export_dir / "saved_model")).path == str(export_dir / "model.keras")
    with pytest.raises(UserError, match=r"its images are \(8, 8, 3\), meta.json says \(16, 16, 3\)"):
        saved_model_check.check(str(alone / "saved_model"), (16, 16, 3), 3)


def test_a_keras_file_with_a_lambda_layer_is_refused_in_safe_mode(tmp_path):
    import keras
    from libml.export import saving
    marker = tmp_path / "ran"
    inputs = keras.Input([8, 8, 3])
    outputs = keras.layers.Lambda(lambda x: x * 2, name="logits")(inputs)
    keras.Model(inputs, outputs).save(tmp_path / "model.keras")
    with pytest.raises(UserError, match=r"cannot load .*model\.keras \(ValueError: .*[Ll]ambda"):
        saving.load_classifier(str(tmp_path / "model.keras"))
    assert not marker.exists()


@pytest.mark.parametrize("meta, message", [
    ("{not json", r"unreadable .*meta\.json \(Expecting property name"),
    (json.dumps({"width": 8, "channels": 3}), r"malformed .*meta\.json \(no height\)"),
    (json.dumps({"height": "8", "width": 8, "channels": 3}), r"height, width and channels are not positive"),
    (json.dumps({"height": 16, "width": 16, "channels": 3, "nclass": 3}),
     r"takes 8x8x3 images and gives 3 classes, but .*meta\.json says 16x16x3 and 3: the two come "
     r"from different exports"),
    (json.dumps({"height": 8, "width": 8, "channels": 3, "nclass": 5}), r"says 8x8x3 and 5"),
    (json.dumps([1, 2]), r"it holds a list, not an object"),
])
def test_a_bad_meta_json_is_one_line(export_dir, tmp_path, meta, message):
    from realmix_tf import predict
    for keep in (("model.keras", "meta.json"), ("saved_model", "meta.json")):
        folder = export_copy(export_dir, tmp_path / keep[0], keep)
        (folder / "meta.json").write_text(meta)
        with pytest.raises(UserError, match=message):
            predict.Predictor(str(folder))


def test_class_names_and_file_names_cannot_become_formulas(export_dir, tmp_path):
    from realmix_tf import predict
    folder = export_copy(export_dir, tmp_path)
    meta = json.load(open(folder / "meta.json"))
    meta["class_names"] = ["=HYPERLINK(\"http://x\")", "+1", "@SUM(A1)"]
    json.dump(meta, open(folder / "meta.json", "w"))
    images = image_folder(tmp_path, names=("-2+3.png", "=cmd.png", "plain.png"))
    output = tmp_path / "out.csv"
    predict.predict_files(str(folder), [str(images)], str(output), show_progress=False)
    rows = list(csv.reader(open(output)))
    assert rows[0][4:] == ["p_=HYPERLINK(\"http://x\")", "p_+1", "p_@SUM(A1)"]
    assert sorted(r[0] for r in rows[1:]) == ["'-2+3.png", "'=cmd.png", "plain.png"]
    assert {r[2] for r in rows[1:]} <= {"'=HYPERLINK(\"http://x\")", "'+1", "'@SUM(A1)"}
    assert all(not cell.startswith(("=", "+", "-", "@")) for r in rows for cell in r[:3])


def test_output_that_is_a_folder_is_one_line_even_with_overwrite(export_dir, tmp_path):
    from realmix_tf import predict
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=r"--output=.*out is a folder: pass a file name"):
        predict.predict_files(str(export_dir), [str(image_folder(tmp_path))], str(tmp_path / "out"),
                              overwrite=True, show_progress=False)


# ---------------------------------------------------------------------------------------------
# Unbounded inputs: pixels, --size, symlink loops, FIFOs

def test_an_image_above_the_pixel_cap_is_refused_before_decoding(tmp_path):
    from PIL import Image
    from libml.data import images
    path = tmp_path / "wide.png"
    Image.new("I;16", (3000, 2000)).save(path)            # 6 megapixels, a few KB of PNG
    with pytest.raises(images.TooLarge, match=r"3000x2000 is 6\.0 megapixels, above the cap of 5: "
                                               r"pass --max_megapixels=6 or more"):
        images.load_image(str(path), 8, max_megapixels=5)
    assert images.load_image(str(path), 8, max_megapixels=6).shape == (8, 8, 1)
    with pytest.raises(UserError, match=r"unreadable image .*wide\.png \(TooLarge: 3000x2000"):
        images.load_images([str(path)], 8, max_megapixels=5)
    with pytest.raises(UserError, match=r"--max_megapixels=0: pass a positive number"):
        images.load_images([str(path)], 8, max_megapixels=0)
    assert images.MAX_MEGAPIXELS == 50


def test_predict_command_takes_max_megapixels(export_dir, tmp_path):
    from PIL import Image
    from realmix_tf import predict
    folder = image_folder(tmp_path)
    Image.new("RGB", (1200, 1000)).save(folder / "big.png")
    args = ["predict", f"--model={export_dir}", str(folder), "--progress=false"]
    with pytest.raises(UserError, match=r"big\.png \(TooLarge: 1200x1000 is 1\.2 megapixels"):
        predict.main(args + ["--max_megapixels=1", f"--output={tmp_path / 'a.csv'}"])
    assert predict.main(args + ["--max_megapixels=2", f"--output={tmp_path / 'b.csv'}"]) == 0


def test_a_symlink_loop_is_walked_once(tmp_path):
    from libml.data import images
    image_folder(tmp_path, names=("a.png",))
    root = tmp_path / "images"
    (root / "sub").mkdir()
    image_folder(root / "sub", names=("b.png",))
    os.symlink(root, root / "loop")
    os.symlink(root, root / "sub" / "back")
    pattern = str(root / "**" / "*.png")
    found = images.expand_pattern(pattern)
    assert found == [str(root / "a.png"), str(root / "sub" / "images" / "b.png")]
    assert [p for p, _ in images.find_images([pattern])] == found
    os.chdir(tmp_path)
    assert images.expand_pattern("images/**/a.png") == ["images/a.png"]
    assert images.expand_pattern("images/*.png") == ["images/a.png"]


def test_fifos_are_skipped_and_never_opened(tmp_path):
    from libml.data import images
    folder = image_folder(tmp_path, names=("a.png",))
    os.mkfifo(folder / "blocks.png")
    summary = images.ReadSummary()
    assert images.list_images(str(folder), summary) == [str(folder / "a.png")]
    assert summary.not_images == {images.NOT_REGULAR: 1}
    assert images.expand_pattern(str(folder / "*.png")) == [str(folder / "a.png")]
    with pytest.raises(UserError, match=r"blocks\.png is not a regular file \(a FIFO"):
        images.find_images([str(folder / "blocks.png")])
    with pytest.raises(UserError, match=r"blocks\.png \(ValueError: not a regular file\)"):
        images.load_images([str(folder / "blocks.png")], 8)


def test_create_datasets_custom_bounds_the_size_and_needs_two_classes(tmp_path):
    from data_prep import create_datasets
    from tests.fixtures_archives import write_image_folders
    write_image_folders(str(tmp_path / "one"), {"cat": 3}, shape=(10, 10, 3))
    base = ["create_datasets", "custom", "--name=pets", f"--data_dir={tmp_path / 'data'}",
            f"--labeled_dir={tmp_path / 'one'}", f"--test_dir={tmp_path / 'one'}"]
    with pytest.raises(UserError, match=r"--size=100000: use an image size of 8 to 1024 pixels"):
        create_datasets.main(base + ["--size=100000"])
    with pytest.raises(UserError, match=r"has 1 class folder \(cat\): a classifier needs at least 2"):
        create_datasets.main(base + ["--size=8"])
    assert not os.path.exists(tmp_path / "data" / "pets-train.tfrecord")


def test_custom_set_too_large_for_memory_is_refused_before_decoding(monkeypatch):
    from data_prep import image_folders
    monkeypatch.setattr(image_folders, "available_memory", lambda: 2 ** 30)
    image_folders.check_memory(1000, 256)     # 0.4 GB
    with pytest.raises(UserError, match=r"3000 images of 256x256 need about 1\.1 GB of memory, "
                                        r"1\.0 GB is available: use a smaller --size"):
        image_folders.check_memory(3000, 256)


# ---------------------------------------------------------------------------------------------
# extend_unlabeled: flags and disk faults in one line

from tests.test_faults import small_disk  # noqa: E402,F401 (fixture: a 2 MB tmpfs, root only)


def test_extend_unlabeled_negative_parallel_is_one_line(tmp_path):
    from data_prep import extend_unlabeled
    from tests.fixtures_data import make_ssl_dataset
    toy = make_ssl_dataset(tmp_path, nlabeled=16, nunlabeled=48, nvalid=8, ntest=16, size=8)
    with pytest.raises(UserError, match=r"^--parallel=-3 is negative: pass 0 \(one worker per CPU\)"):
        extend_unlabeled.main(["extend_unlabeled", f"--dataset={toy.name}", "--copies=2",
                               "--parallel=-3", f"--data_dir={toy.root}", "--noprogress"])


def test_extend_unlabeled_on_a_full_then_a_read_only_disk(small_disk, monkeypatch):
    from data_prep import extend_unlabeled
    from tests.fixtures_data import make_ssl_dataset
    toy = make_ssl_dataset(os.path.join(small_disk.path, "data"), nlabeled=16, nunlabeled=48,
                           nvalid=8, ntest=16, size=8)
    dataset = toy.name
    small_disk.fill(leave_bytes=60_000)
    monkeypatch.setattr(extend_unlabeled, "_check_disk", lambda *a, **k: None)   # the disk fills meanwhile
    with pytest.raises(UserError) as e:
        extend_unlabeled.extend_unlabeled(dataset, toy.root, copies=50, aug="erase", seed=0, progress=False)
    assert str(e.value).startswith("no space left on the disk of ") and "\n" not in str(e.value)
    assert "complete shards are kept" in str(e.value)
    folder = os.path.join(toy.root, "SSL", "extend", dataset, "erase50-seed0")
    assert not [f for f in os.listdir(folder) if ".tmp-" in f]          # no half shard
    kept = sorted(f for f in os.listdir(folder) if f.startswith("shard-"))
    os.remove(os.path.join(small_disk.path, "filler"))
    small_disk.read_only()
    with pytest.raises(UserError, match=r"cannot write the extension to .* \(read-only file system\)"):
        extend_unlabeled.extend_unlabeled(dataset, toy.root, copies=50, aug="erase", seed=1, progress=False)
    assert sorted(f for f in os.listdir(folder) if f.startswith("shard-")) == kept


def test_a_negative_trainer_seed_is_one_line():
    from libml.train.config import TrainConfig
    with pytest.raises(UserError, match=r"^--seed=-5 is negative: use a seed >= 0$"):
        TrainConfig(seed=-5).validate()
    with pytest.raises(UserError, match=r"^--extend_seed=-1 is negative"):
        TrainConfig(extend_seed=-1).validate()


# ---------------------------------------------------------------------------------------------
# Silent wrong results: non-finite weights with a finite loss; another --train_kimg

def test_nonfinite_weights_with_a_finite_loss_are_never_reported(tmp_path):
    """Only the EMA weights go bad (the loss, computed with the raw net, stays finite): the run
    stops before the report, so neither stats/ nor TensorBoard sees the poisoned figures."""
    import tensorflow as tf
    from libml.run import finite
    from libml.run import summaries
    from tests.test_faults import tiny, trainer_of
    from tests.fixtures_data import make_ssl_dataset
    data = make_ssl_dataset(tmp_path / "data", nlabeled=16, nunlabeled=48, nvalid=8, ntest=16, size=8)
    trainer = trainer_of(tiny(data, tmp_path / "runs"))
    period = trainer._train_period

    def poisoned(step, end, folder, ckpt):
        sums, step = period(step, end, folder, ckpt)
        if step > 32:
            variable = trainer.model.ema_net.trainable_variables[0]
            variable.assign(tf.fill(variable.shape, float("nan")))
        return sums, step

    trainer._train_period = poisoned
    with pytest.raises(finite.DivergenceError) as e:
        trainer.run()
    assert str(e.value).startswith("weights are not finite (") and "at step 64 (0.0625 kimg)" in str(e.value)
    history = json.load(open(os.path.join(trainer.run_dir, "stats", "accuracy_history.json")))
    assert [h["step"] for h in history] == [32]
    events = summaries.read_events(trainer.tf_dir)
    assert [step for step, _ in events["accuracy"]] == [32]


def _fake_checkpoint(run_dir):
    tf_dir = os.path.join(run_dir, "tf")
    os.makedirs(tf_dir)
    for suffix in (".index", ".data-00000-of-00001"):
        open(os.path.join(tf_dir, "model.ckpt-64" + suffix), "w").close()


def test_a_new_train_kimg_says_that_it_starts_another_run(tmp_path, capsys):
    from libml.run.runfolder import RunFolder
    from libml.train.trainer import run_folder_name
    hparams = dict(gamma=0.5, train_kimg=1024, tsa="linear", wd=0.02)
    old = tmp_path / run_folder_name("RealMix", hparams)
    _fake_checkpoint(old)
    unrelated = tmp_path / run_folder_name("RealMix", dict(hparams, gamma=0.25, train_kimg=512))
    _fake_checkpoint(unrelated)
    new = tmp_path / run_folder_name("RealMix", dict(hparams, train_kimg=2048))
    folder = RunFolder(str(new), keep=2).open({})
    folder.close()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"note: this is a new run ({new}): --train_kimg "
                                                   f"sets this algorithm's schedule")
    assert "exists with --train_kimg=1024; to continue that run instead" in err
    RunFolder(str(old), keep=2).open({}).close()        # resuming the old one: no note
    assert "note:" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Leftovers: an export killed mid-write

def test_an_export_folder_left_by_a_kill_is_removed_by_the_next_launch(tmp_path, capsys):
    from libml.run.runfolder import RunFolder
    from tests.test_faults import dead_pid
    run = tmp_path / "run"
    left = run / f"saving.tmp-{dead_pid()}"
    (left / "saved_model" / "variables").mkdir(parents=True)
    (left / "model.keras").write_bytes(b"half")
    (left / "saved_model" / "variables" / "variables.index").write_bytes(b"half")
    live = run / f"saving.tmp-{os.getpid()}"            # a live writer's (this process)
    live.mkdir()
    RunFolder(str(run), keep=2).open({}).close()
    assert not left.exists() and live.exists()
    assert "removed 1 unfinished temporary file(s) of a stopped run" in capsys.readouterr().err


def test_create_datasets_command_on_a_crafted_archive_is_one_line_and_runs_nothing(tmp_path):
    """The realistic path: the archive sits in $ML_DATA/downloads and is picked up by itself."""
    marker = tmp_path / "ran"
    data = tmp_path / "ml_data"
    (data / "downloads").mkdir(parents=True)
    _write_archive(data / "downloads" / "cifar-10-python.tar.gz", _cifar_members(
        lambda n, b: _Exploit(f"touch {marker}") if n == "data_batch_1" else b))
    env = dict(os.environ, ML_DATA=str(data), TF_CPP_MIN_LOG_LEVEL="3")
    result = subprocess.run([sys.executable, "-m", "data_prep.create_datasets", "cifar10", "--nodownload"],
                            cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr[-2000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "data_batch_1 is not a CIFAR batch (it names posix.system" in errors[0]
    assert not marker.exists() and sorted(os.listdir(data)) == ["downloads"]


def test_an_export_killed_between_its_renames_gets_its_previous_export_back(tmp_path):
    from libml.run.runfolder import RunFolder
    from tests.test_faults import dead_pid
    run = tmp_path / "run"
    pid = dead_pid()
    (run / f"export.tmp-{pid}").mkdir(parents=True)           # the new export, maybe complete
    (run / f"export.old-{pid}").mkdir()                       # the previous one, set aside
    (run / f"export.old-{pid}" / "meta.json").write_text("{}")
    RunFolder(str(run), keep=2).open({}).close()
    assert sorted(os.listdir(run)) == ["export"] and (run / "export" / "meta.json").exists()
    (run / f"export.old-{pid}").mkdir()                       # with export/ present: removed
    RunFolder(str(run), keep=2).open({}).close()
    assert sorted(os.listdir(run)) == ["export"]
