"""--short_run_scaling (on by default): a run shorter than its EMA/BN averages or its warm-up in
kimg adapts them and the start banner says so; the paper's full-length runs are unchanged."""
import dataclasses
import shlex

import pytest

from libml.base import cli
from libml.train.config import TrainConfig
from realmix_tf import registry
from runs import paper_commands


def test_sixteen_kimg_adapts_the_warmup_and_the_averages():
    # The case: --train_kimg=16 at batch 64 = 256 steps, --warmup_kimg=1024 (default).
    config = registry.configure("mixmatch", _parse("mixmatch", "--train_kimg=16", "--report_kimg=4"))
    assert config.short_run_scaling is True                                  # the default
    defaults = registry.get("mixmatch").model_class().hparam_defaults()
    kwargs = config.model_kwargs(defaults)
    assert kwargs["warmup_kimg"] == 4                                        # 16 / 4
    assert kwargs["ema"] == kwargs["bn_momentum"] == 1 - 10 / 256
    assert config.short_run_line(defaults) == (
        "short run 16 kimg = 256 steps: --ema 0.999 -> 0.960938, --bn_momentum 0.999 -> 0.960938, "
        "--warmup_kimg 1024 -> 4 (EMA/BN averages over ~1/(1-decay) steps, warm-ups by a quarter "
        "of the run); --noshort_run_scaling keeps the flags")
    # --noshort_run_scaling keeps the flags, and the banner still says what they do.
    kept = dataclasses.replace(config, short_run_scaling=False)
    assert (kept.model_kwargs(defaults)["warmup_kimg"], kept.model_kwargs(defaults)["ema"]) == (1024, 0.999)
    assert kept.short_run_line(defaults).startswith(
        "short run 16 kimg = 256 steps: --noshort_run_scaling keeps the flags although the averages "
        "or warm-up outlast the run; the default would use --ema 0.999 -> 0.960938")
    # A warm-up given shorter than a quarter stays; an explicit --ema below the cap stays.
    config = TrainConfig(train_kimg=16, ema=0.9, algorithm=dict(warmup_kimg=2))
    assert config.model_kwargs()["warmup_kimg"] == 2 and config.model_kwargs()["ema"] == 0.9
    assert [k for k, _, _ in config.short_run_changes()] == ["bn_momentum"]


def test_the_built_model_uses_the_adapted_values_and_the_banner_names_them(tmp_path, capsys):
    from tests.fixtures_data import make_ssl_dataset, test_options
    toy = make_ssl_dataset(tmp_path / "data", nlabeled=16, nunlabeled=16, nvalid=8, ntest=16, size=8)
    config = TrainConfig(dataset=toy.name, data_dir=toy.root, train_dir=str(tmp_path / "runs"),
                         batch=8, filters=4, repeat=1, train_kimg=0.25, report_kimg=0.25,
                         save_kimg=0.25, eval_batch=64, progress=False, export=False)
    trainer = registry.make_trainer("realmix", config, data_options=test_options())
    assert trainer.model.warmup_kimg == 0.0625 and trainer.model.ema_decay == 1 - 10 / 32
    assert {bn.momentum for bn in trainer.model.net.bn_layers()} == {1 - 10 / 32}
    assert trainer.hparams["warmup_kimg"] == 0.0625            # in the run folder's name
    trainer._print_banner("fresh start", 0)
    assert ("  short run 0.25 kimg = 32 steps: --ema 0.999 -> 0.6875, --bn_momentum 0.999 -> "
            "0.6875, --warmup_kimg 1024 -> 0.0625") in capsys.readouterr().err


def _parse(name, *args):
    values = registry.define_flags(name)
    cli.parse(values, [registry.get(name).module, *args])
    return values


def test_the_papers_commands_are_unchanged():
    trains = [c for c in paper_commands.all_commands(paper_commands.Settings())
              if c.experiment is not None]
    assert len(trains) > 20
    for command in trains:
        name = registry.get(command.module).name
        algorithm = registry.get(command.module)
        argv = [a for a in command.argv("/data", "/train")   # data and transfer source not needed
                if not a.startswith(("--extend", "--load_checkpoint"))]
        config = registry.configure(command.module, _parse(command.module, *argv))
        defaults = algorithm.model_class().hparam_defaults()
        kept = dataclasses.replace(config, short_run_scaling=False)
        assert config.short_run_changes(defaults) == [], shlex.join(argv)
        assert config.short_run_line(defaults) == ""
        assert config.model_kwargs(defaults) == kept.model_kwargs(defaults), (name, argv)
