"""realmix_tf/legacy_flags.py: the original libml flags are accepted, mapped or announced once."""
import pytest
from absl import flags

from realmix_tf import legacy_flags
from libml.base.errors import UserError


@pytest.fixture
def parse():
    def parse_args(*args):
        fv = flags.FlagValues()
        flags.DEFINE_integer("batch", 64, "", flag_values=fv)   # a flag the project owns
        legacy_flags.define(fv)
        legacy_flags.define(fv)                                   # idempotent
        fv(["prog", *args])
        return fv
    return parse_args


def test_libml_command_line_parses(parse):
    fv = parse("--arch=resnet", "--whiten", "--shuffle=8192", "--para_parse=4", "--para_augment=8",
               "--p_unlabeled=", "--nu=2", "--epochs=1024", "--class_mapping=m.json",
               "--custom_dataset", "--nclass=10", "--img_size=32", "--label_size=250 500",
               "--valid_size=1 500", "--augment=cifar10", "--nomemoize", "--batch=32")
    assert fv.batch == 32 and fv.label_size == ["250", "500"]
    overrides, notes = legacy_flags.resolve(fv, train_kimg=65536, report_kimg=64,
                                           shuffle_buffer_given=False)
    assert overrides == {"shuffle_buffer": 8192}           # epochs x report = train_kimg: no cut
    assert len(notes) == 1
    assert notes[0].startswith("libml flags without effect here: --whiten (images are scaled to "
                               "[-1, 1], libml's default); --para_parse (tf.data tunes")
    for name in ("para_augment", "p_unlabeled", "class_mapping", "custom_dataset", "nclass",
                 "img_size", "label_size", "valid_size", "augment", "memoize"):
        assert f"--{name} (" in notes[0]
    assert "--arch" not in notes[0] and "--nu " not in notes[0] and "--shuffle" not in notes[0]


def test_nothing_given_nothing_said(parse):
    assert legacy_flags.resolve(parse(), 64, 1, False) == ({}, [])


def test_mappings(parse):
    overrides, notes = legacy_flags.resolve(parse("--epochs=3"), train_kimg=100, report_kimg=4,
                                           shuffle_buffer_given=False)
    assert overrides == {"train_kimg": 12} and notes == ["--epochs=3: run length 12 kimg (3 reports of 4 kimg)"]
    overrides, notes = legacy_flags.resolve(parse("--shuffle=100"), 64, 1, shuffle_buffer_given=True)
    assert overrides == {} and notes == ["--shuffle ignored: --shuffle_buffer is given"]


@pytest.mark.parametrize("args,message", [
    (["--arch=shake"], "--arch=shake: only resnet"),
    (["--nu=3"], "--nu=3: RealMix and MixMatch here always use 2"),
    (["--shuffle=-1"], "--shuffle=-1 is negative"),
    (["--epochs=0"], "--epochs=0 must be positive"),
])
def test_impossible_values(parse, args, message):
    with pytest.raises(UserError, match=message):
        legacy_flags.resolve(parse(*args), 64, 1, False)
