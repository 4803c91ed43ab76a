"""--eval_ckpt=RUN_DIR with no other flag: the dataset, architecture and hyper-parameters come
from the run's args/args.json (libml/run/recorded_flags.py)."""
import json
import os

import pytest

from libml.base.errors import UserError
from libml.run import recorded_flags
from realmix_tf import registry
from tests.fixtures_data import make_ssl_dataset, test_options


def test_settings_to_take_fills_what_was_not_passed_and_refuses_another_architecture():
    recorded = dict(dataset="toy.1@16-8", filters=8, repeat=1, scales=0, gamma="auto",
                    load_checkpoint="/elsewhere", image_shape=[8, 8, 3])
    names = ["dataset", "filters", "repeat", "scales", "gamma", "load_checkpoint", "lr"]
    take, listed = recorded_flags.settings_to_take(recorded, names, {"repeat": 1})
    assert take == dict(dataset="toy.1@16-8", filters=8, scales=0, gamma="auto")
    assert listed == ["dataset", "filters", "gamma", "scales"]
    with pytest.raises(UserError, match=r"^RUN was trained with another architecture: "
                                        r"--filters=16 \(the run has 8\); drop these flags"):
        recorded_flags.settings_to_take(recorded, names, {"filters": 16}, "RUN")


def test_run_folder_of_every_form_eval_ckpt_takes(tmp_path):
    run = tmp_path / "RealMix_x"
    (run / "args").mkdir(parents=True)
    (run / "args" / "args.json").write_text("{}")
    (run / "tf").mkdir()
    for path in (run, run / "tf", run / "tf" / "model.ckpt-128", run / "tf" / "model.ckpt-128.index"):
        assert recorded_flags.run_folder_of(str(path)) == str(run)
    assert recorded_flags.run_folder_of(str(tmp_path)) is None


def test_eval_ckpt_of_a_run_dir_alone_evaluates_it(tmp_path, monkeypatch, capsys):
    toy = make_ssl_dataset(tmp_path / "data", name="other", nclass=4, nlabeled=16, nunlabeled=16,
                           nvalid=8, ntest=16, size=8)
    # Not the default architecture nor the default dataset.
    trained = registry.launch("supervised", dict(
        dataset=toy.name, data_dir=toy.root, train_dir=str(tmp_path / "runs"), batch=8, filters=8,
        repeat=1, scales=2, train_kimg=0.015625, report_kimg=0.015625, save_kimg=0.015625,
        eval_batch=64, export=False, progress=False, smoothing=0.1), data_options=test_options())
    monkeypatch.setenv("ML_DATA", toy.root)       # as the README: the data under $ML_DATA
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    result = registry.launch("supervised", dict(eval_ckpt=trained["run_dir"]),
                             data_options=test_options())
    err = capsys.readouterr().err
    assert result["step"] == 16 and result["checkpoint"].endswith("model.ckpt-16")
    with open(os.path.join(trained["run_dir"], "stats", "accuracy_history.json")) as f:
        last = json.load(f)[-1]
    assert result["ema"]["test"] == pytest.approx(last["test"])
    assert (f"note: --eval_ckpt: the flags not given come from "
            f"{os.path.join(trained['run_dir'], 'args', 'args.json')}: --dataset={toy.name}, "
            f"--filters=8, --repeat=1, --scales=2, ") in err
    # A passed architecture flag that differs from the run's: one line naming the recorded value.
    with pytest.raises(UserError, match=r"another architecture: --filters=16 \(the run has 8\)"):
        registry.launch("supervised", dict(eval_ckpt=trained["run_dir"], filters=16))
