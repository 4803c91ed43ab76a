"""The algorithms: one table, the one command-line main, and `launch` (the same in-process).

    python -m realmix_tf.<module> --flags...      ->  cli(name)      (exit 2 + one line on bad input)
    launch(name, {"dataset": ..., "gamma": 0.6})   ->  the stats dict of the run (runs/ use this)

Both go through `configure`: the trainer's flags, the algorithm's and the original libml
flags this project lacks (realmix_tf/legacy_flags.py: accepted, mapped or noted once) are defined on
one FlagValues, parsed by absl, turned into a validated TrainConfig plus the algorithm's
hyper-parameters; the model constructor checks those when the Trainer builds it.

An algorithm module (realmix_tf/<module>.py) defines:
    the model class, named as its REGISTRY entry (= the run-folder prefix), an SSLModel whose
    HPARAMS declare its hyper-parameters once (flag, default, help, check: libml.train.algorithm.hparam),
    whose `unlabeled` declares its data and whose `train_loss` is the algorithm;
    optionally Config (a TrainConfig subclass: another kind of dataset name and data);
    `if __name__ == "__main__": registry.cli("<name>")`.
Adding an algorithm = that file + one line in REGISTRY.
"""
import dataclasses
import importlib
import sys
from typing import Dict, List, Optional

from absl import flags

from libml.base import cli as cli_runner
from libml.train import config as train_config
from realmix_tf import legacy_flags
from libml.train import trainer as train
from libml.base.errors import UserError
from libml.run import recorded_flags


@dataclasses.dataclass(frozen=True)
class Algorithm:
    module: str     # python -m <module>
    name: str       # model class in the module and run-folder prefix

    def load(self):
        return importlib.import_module(self.module)

    def model_class(self):
        return getattr(self.load(), self.name)

    def config_class(self):
        return getattr(self.load(), "Config", train_config.TrainConfig)

    def flag_names(self) -> List[str]:
        """The command-line flags of the algorithm's own hyper-parameters."""
        return [k for k, hp in self.model_class().hparam_table().items() if hp.flag]


REGISTRY: Dict[str, Algorithm] = {
    "realmix": Algorithm("realmix_tf.realmix", "RealMix"),
    "mixmatch": Algorithm("realmix_tf.mixmatch", "MixMatch"),
    "mean_teacher": Algorithm("realmix_tf.mean_teacher", "MeanTeacher"),
    "pi_model": Algorithm("realmix_tf.pi_model", "PiModel"),
    "vat": Algorithm("realmix_tf.vat", "VAT"),
    "supervised": Algorithm("realmix_tf.supervised", "Supervised"),
    "fully_supervised": Algorithm("realmix_tf.fully_supervised", "FullySupervised"),
    "fixmatch": Algorithm("realmix_tf.fixmatch", "FixMatch"),
    "iomatch": Algorithm("realmix_tf.iomatch", "IOMatch"),
    "openmatch": Algorithm("realmix_tf.openmatch", "OpenMatch"),
}


def get(name: str) -> Algorithm:
    """The registry entry of a command name (realmix), a run-folder prefix (RealMix) or a
    module (realmix_tf.realmix)."""
    if name in REGISTRY:
        return REGISTRY[name]
    for algorithm in REGISTRY.values():
        if name in (algorithm.name, algorithm.module):
            return algorithm
    raise UserError(f"unknown algorithm {name!r}: use one of {', '.join(REGISTRY)}")


def define_flags(name: str, flag_values: Optional[flags.FlagValues] = None) -> flags.FlagValues:
    """The trainer's and the algorithm's flags on flag_values (a new FlagValues if None)."""
    algorithm = get(name)
    flag_values = flags.FlagValues() if flag_values is None else flag_values
    train_config.define_train_flags(flag_values, algorithm.config_class())
    model_class = algorithm.model_class()
    for key, hp in model_class.hparam_table().items():
        if hp.flag and key not in flag_values:
            train_config.define_flag(key, hp.default, hp.help, flag_values)
    for alias, key in getattr(model_class, "FLAG_ALIASES", {}).items():
        if alias not in flag_values:
            flags.DEFINE_alias(alias, key, flag_values=flag_values)
    legacy_flags.define(flag_values)    # the original libml flags this project lacks, last
    return flag_values


def hparams_from_flags(name: str, flag_values: flags.FlagValues) -> dict:
    """The algorithm's constructor arguments of parsed flags (each declared hyper-parameter's
    `parse` applied)."""
    table = get(name).model_class().hparam_table()
    return {key: table[key].value(flag_values[key].value) for key in get(name).flag_names()}


def configure(name: str, flag_values: flags.FlagValues) -> train_config.TrainConfig:
    """The validated TrainConfig of parsed flags, the algorithm's hyper-parameters included."""
    algorithm = get(name)
    model_class = algorithm.model_class()
    recorded_flags.say(recorded_flags.apply_to_flags(      # --eval_ckpt=RUN: the run's settings
        flag_values, list(train_config.flag_settings(flag_values, algorithm.config_class()))
        + algorithm.flag_names()))
    hparams = hparams_from_flags(name, flag_values)
    if model_class.unlabeled is None and flag_values.extend:
        raise UserError(f"--extend is set but {algorithm.name} does not read unlabeled images: "
                        f"drop --extend")
    settings = train_config.flag_settings(flag_values, algorithm.config_class())
    overrides, notes = legacy_flags.resolve(       # the original libml flags: mapped or noted
        flag_values, settings.get("train_kimg", 0), settings.get("report_kimg", 1),
        "shuffle_buffer" in flag_values and flag_values["shuffle_buffer"].present)
    for note in notes:
        print(f"note: {note}", file=sys.stderr)
    config = train_config.config_from_flags(flag_values, algorithm.config_class(), overrides,
                                            **hparams)
    run_length = ({"train_kimg": config.train_kimg}
                  if "train_kimg" in model_class.hparam_table() else {})
    model_class.check_hparams(**hparams, **run_length)
    return config


def make_trainer(name: str, config: train_config.TrainConfig, **trainer_options) -> train.Trainer:
    """The Trainer of a run (trainer_options: strategy, data_options for tests)."""
    algorithm = get(name)
    return train.Trainer(config, algorithm.model_class().from_config, algorithm.name,
                         **trainer_options)


def main(name: str, argv: List[str], flag_values: flags.FlagValues = flags.FLAGS):
    """The command line's main, after absl parsed flag_values: returns the run's stats."""
    if len(argv) > 1:
        raise UserError(f"unexpected arguments {' '.join(argv[1:])}: every option is a --flag "
                        f"(see --helpfull)")
    config = configure(name, flag_values)
    legacy_flags.apply_runtime(flag_values)
    return make_trainer(name, config).run()


def cli(name: str) -> None:
    """`python -m realmix_tf.<module>`: defines the flags, parses, runs, exits (2 on bad input)."""
    define_flags(name, flags.FLAGS)
    cli_runner.run(lambda argv: main(name, argv))


def flag_args(values: dict) -> List[str]:
    """{"gamma": 0.6, "export": False} -> ["--gamma=0.6", "--noexport"]."""
    args = []
    for key, value in values.items():
        if isinstance(value, bool):
            args.append(f"--{'' if value else 'no'}{key}")
        else:
            args.append(f"--{key}={value}")
    return args


def launch(name: str, values: dict, **trainer_options) -> dict:
    """Runs an algorithm in this process as its command line would with these flags (parsed
    and validated the same way); returns the run's stats plus its folder (`run_dir`)."""
    flag_values = define_flags(name)
    cli_runner.parse(flag_values, [get(name).module] + flag_args(values))
    trainer = make_trainer(name, configure(name, flag_values), **trainer_options)
    return dict(trainer.run(), run_dir=trainer.run_dir)
