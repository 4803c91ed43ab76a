"""SSLModel: what every semi-supervised algorithm here shares (spec §6.8, §13).

- `net`: the raw Wide ResNet; its BN moving statistics are the live ones.
- `ema_net`: the same architecture; its trainable weights are the EMA shadows
  (shadow <- shadow - (1 - ema) * (shadow - var), constant decay, starting at the initial
  weights) and its BN moving statistics are copied from `net` after every update, so
  `ema_net` alone is a complete, exportable model: EMA weights + live BN statistics.
- `optimizer`: Adam(lr, epsilon=1e-8), in a LossScaleOptimizer under mixed_float16.
- `step`: int64 count of labeled images seen (each step adds the global batch).
- `apply_update(grads)`: Adam step, then decoupled weight decay of the conv and dense kernels
  (k <- k * (1 - wd * lr)), then the EMA update and the BN-statistics copy.

Every setting comes through the constructor and is kept as given (bn_momentum too: it is
passed to the networks, so an exported model's get_config() records it). The settings shared
by every algorithm are checked by the same check functions as their flags (libml/train/config.py).

The base class owns the step (`train_step`): shape checks against the declared data, the
random draws of the step (global: R replicas draw what one device draws), the gradient tape,
loss scaling, the update, weight decay, EMA, the image count and the one cross-replica sum of
the reported scalars. An algorithm (realmix_tf/<algo>.py) writes only:

    HPARAMS = {"beta": hparam(0.75, "help", check)}   # each hyper-parameter declared once:
                                                      # flag, default, help, check
    unlabeled = Unlabeled(views=("weak", "strong"), ratio=7)   # its data; None: labeled only
    def train_loss(self, labeled, unlabeled, step, draws) -> (loss, {tag: this replica's share})
    def draws(self, step, batch) -> dict     # optional: random draws of the global batch
    def build_heads(self) -> [(layer, EMA copy)]  # optional: trained layers beside the net

`from_config(info, config)` builds it for the trainer.
"""
import dataclasses
from typing import Callable, Dict, Optional

import keras
import tensorflow as tf

from libml.nn import replicas
from libml.data.pipeline import Unlabeled

from libml.train.config import PRECISIONS, decay, non_negative, one_of, positive, whole_kimg
from libml.base.errors import UserError
from libml.nn.wrn import WideResNet, scales_for_size


def run_cross_replica(fn, *args):
    """Runs fn(strategy, *args) once in cross-replica context, from replica or cross-replica
    code (per-replica tensors in `args` arrive as PerReplica values)."""
    context = tf.distribute.get_replica_context()
    if context is None:
        return fn(tf.distribute.get_strategy(), *args)
    return context.merge_call(fn, args=args)


def tf_variable(v):
    return v.value if isinstance(v, keras.Variable) else v


LOSS_NCLASS_HELP = ("Class count that the class-averaged unlabeled losses divide by (MixMatch / "
                     "RealMix L2 and OOD-mask mean, Mean Teacher / Π-model consistency): 0 = the "
                     "dataset's; 10 on the 6-class mismatch sets = the released loss scale "
                     "(10-way head).")


def check_loss_nclass(loss_nclass, nclass=None) -> int:
    """--loss_nclass: 0 (the dataset's class count) or a whole number >= nclass (UserError)."""
    if loss_nclass != int(loss_nclass) or loss_nclass < 0 or (
            loss_nclass and nclass is not None and loss_nclass < nclass):
        raise UserError(f"--loss_nclass={loss_nclass}: use 0 (the dataset's {nclass or 'C'} "
                        f"classes) or a whole number of classes >= that (10 = the released "
                        f"scale on the 6-class mismatch sets)")
    return int(loss_nclass)



def check_settings(precision, ema, bn_momentum, lr, wd):
    """The shared settings, checked with the same functions as their trainer flags."""
    one_of(*PRECISIONS)("precision", precision)
    decay("ema", ema)
    decay("bn_momentum", bn_momentum)
    positive("lr", lr)
    non_negative("pass a weight decay >= 0")("wd", wd)


@dataclasses.dataclass(frozen=True)
class HParam:
    """One algorithm hyper-parameter: its default, its --help text and its check(name, value)
    (a one-line UserError); `parse` turns the flag's value into the constructor's (e.g.
    gamma "auto"); flag=False: a constructor argument only (set by from_config)."""
    default: object
    help: str = ""
    check: Optional[Callable] = None
    parse: Optional[Callable] = None
    flag: bool = True

    def value(self, given):
        """The constructor's value of a given one (the flag's text, or a Python value)."""
        return self.parse(given) if self.parse is not None else given


def hparam(default, help: str = "", check: Optional[Callable] = None, parse=None,
           flag: bool = True) -> HParam:
    return HParam(default, help, check, parse, flag)


LOSS_NCLASS = hparam(0, LOSS_NCLASS_HELP, lambda name, value: check_loss_nclass(value))
TRAIN_KIMG = hparam(65536, check=positive, parse=whole_kimg, flag=False)   # from the config


class SSLModel(keras.Model):
    """Base for RealMix and the baselines. Create it under `strategy.scope()`."""

    HPARAMS: Dict[str, HParam] = {}      # merged along the class hierarchy (hparam_table)
    unlabeled: Optional[Unlabeled] = Unlabeled()   # the declared unlabeled stream; None: none

    def __init__(self, nclass, input_shape, filters=32, repeat=4, scales=0, lr=0.002, wd=0.02,
                 ema=0.999, seed=0, precision="float32", jit_compile=False, bn_momentum=0.999,
                 replica_mode=replicas.GLOBAL, name=None, **hparams):
        table = self.hparam_table()
        unknown = sorted(set(hparams) - set(table))
        if unknown:
            raise TypeError(f"{type(self).__name__} got unknown arguments {unknown}")
        values = {key: hp.value(hparams.get(key, hp.default)) for key, hp in table.items()}
        self.check_hparams(**values)
        if "loss_nclass" in values:
            values["loss_nclass"] = check_loss_nclass(values["loss_nclass"], nclass)
        super().__init__(name=name or type(self).__name__.lower())
        check_settings(precision, ema, bn_momentum, lr, wd)
        one_of(*replicas.REPLICA_MODES)("replica_mode", replica_mode)
        for key, value in values.items():      # each hyper-parameter is an attribute
            setattr(self, key, value)
        self.nclass = int(nclass)
        self.image_shape = tuple(int(d) for d in input_shape)
        self.filters, self.repeat = int(filters), int(repeat)
        self.scales = int(scales) or scales_for_size(self.image_shape[0])
        self.lr, self.wd, self.ema_decay, self.seed = float(lr), float(wd), float(ema), int(seed)
        self.precision = precision
        self.bn_momentum = float(bn_momentum)
        self.use_jit = bool(jit_compile)
        self.replica_mode = replica_mode

        arch = dict(nclass=self.nclass, filters=self.filters, repeat=self.repeat,
                    scales=self.scales, dtype=precision, bn_momentum=self.bn_momentum,
                    cross_replica_bn=replica_mode == replicas.GLOBAL)
        self.net = WideResNet(seed=self.seed, name="net", **arch).build_for(self.image_shape)
        self.ema_net = WideResNet(seed=self.seed, name="ema_net", **arch).build_for(
            self.image_shape)
        self.head_pairs = self.build_heads()   # [(live, ema)] layers beside the nets (none by default)
        # What the optimizer trains: the net's trainable weights, then the heads'.
        self._trained = list(self.net.trainable_variables) + [
            v for live, _ in self.head_pairs for v in live.trainable_variables]
        self._ema_pairs = [pair for live, ema in [(self.net, self.ema_net)] + self.head_pairs
                           for pair in zip(ema.trainable_variables, live.trainable_variables)]
        self._bn_pairs = [(e, n) for le, ln in zip(self.ema_net.bn_layers(), self.net.bn_layers())
                          for e, n in ((le.moving_mean, ln.moving_mean),
                                       (le.moving_variance, ln.moving_variance))]
        self._decayed = [v for v in self._trained if v.path.endswith("kernel")]
        for shadow, var in self._ema_pairs + self._bn_pairs:
            shadow.assign(var)

        optimizer = keras.optimizers.Adam(learning_rate=self.lr, epsilon=1e-8)
        if precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(self._trained)
        self.optimizer = optimizer
        self.step = keras.Variable(0, dtype="int64", trainable=False, name="step",
                                   aggregation="only_first_replica")

        self._losses_and_gradients = self.maybe_jit(self._loss_and_gradients)

    def build_heads(self) -> list:
        """Keras layers the algorithm adds beside `net` (OpenMatch's one-vs-all head, IOMatch's
        heads), as [(live, ema)] pairs, built and made attributes of the model (so checkpointed):
        the live layer's weights train with the net's (Adam, decoupled decay of kernels), the ema
        layer holds their EMA shadows. Called by the constructor once the nets exist; none by
        default. The model keeps them as `head_pairs`."""
        return []

    @classmethod
    def hparam_table(cls) -> Dict[str, HParam]:
        """The declared hyper-parameters of this class and its bases (a subclass's wins)."""
        table = {}
        for klass in reversed(cls.__mro__):
            table.update(vars(klass).get("HPARAMS", {}))
        return table

    @classmethod
    def hparam_defaults(cls) -> dict:
        return {key: hp.default for key, hp in cls.hparam_table().items()}

    @classmethod
    def check_hparams(cls, **hparams):
        """Each declared hyper-parameter's check (the constructor's, without building
        anything: the registry runs them before the data are read), then `check_combination`."""
        table = cls.hparam_table()
        for key, value in hparams.items():
            if key in table and table[key].check is not None:
                table[key].check(key, value)
        cls.check_combination(**{k: hparams.get(k, hp.default) for k, hp in table.items()})

    @classmethod
    def check_combination(cls, **hparams):
        """Checks that involve several hyper-parameters (UserError); none by default."""

    @classmethod
    def from_config(cls, info, config, **kwargs):
        """The model of a run: dataset metadata (nclass, shape) and the config's settings (the
        run length too, for the algorithms that declare train_kimg)."""
        if "train_kimg" in cls.hparam_table():
            kwargs.setdefault("train_kimg", config.train_kimg)
        return cls(info.nclass, info.shape, **dict(config.model_kwargs(cls.hparam_defaults()), **kwargs))

    # ----------------------------------------------------------------------------------------
    def hparams(self) -> dict:
        """Hyper-parameters that define the run (folder name, args.json). Precision and
        jit_compile are left out: they change speed, not the algorithm."""
        hparams = dict(filters=self.filters, repeat=self.repeat, scales=self.scales, lr=self.lr,
                       wd=self.wd, ema=self.ema_decay, seed=self.seed)
        if self.replica_mode != replicas.GLOBAL:    # only then can several devices differ
            hparams["replica_mode"] = self.replica_mode
        return hparams

    @property
    def num_replicas(self) -> int:
        return tf.distribute.get_strategy().num_replicas_in_sync

    def scale_loss(self, loss):
        """The loss to differentiate: this replica's share of the loss (libml/nn/replicas.py: the
        shares of all replicas sum to the loss, and the optimizer sums their gradients),
        scaled by the LossScaleOptimizer under float16."""
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            loss = self.optimizer.scale_loss(loss)
        return loss

    def maybe_jit(self, fn):
        """fn compiled with XLA under jit_compile, else fn itself, traced with the step (a
        nested tf.function could not hold the step's cross-replica collectives)."""
        return tf.function(fn, jit_compile=True) if self.use_jit else fn

    def apply_update(self, grads):
        """Adam step, then kernel-only decoupled weight decay, then the EMA update. A step that
        the float16 loss scaler skips (non-finite gradients) skips all three."""
        decay, ema_rate = 1.0 - self.wd * self.lr, 1.0 - self.ema_decay
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # The inner optimizer counts only the steps it applied.
            counter = tf_variable(self.optimizer.inner_optimizer.iterations)
            before = counter.read_value()
            self.optimizer.apply_gradients(zip(grads, self._trained))
            applied = tf.cast(counter.read_value() > before, tf.float32)
            decay, ema_rate = 1.0 - applied * (self.wd * self.lr), applied * ema_rate
        else:
            self.optimizer.apply_gradients(zip(grads, self._trained))

        def update(strategy, decay, ema_rate):
            for kernel in self._decayed:
                strategy.extended.update(tf_variable(kernel), lambda k, d: k.assign(k * d),
                                         args=(decay,), group=False)
            for shadow, var in self._ema_pairs:
                strategy.extended.update(tf_variable(shadow),
                                         lambda s, v, r: s.assign_sub(r * (s - v)),
                                         args=(tf_variable(var), ema_rate), group=False)

        run_cross_replica(update, decay, ema_rate)
        # BN moving statistics are per-replica (sync on read): each replica copies its own.
        for copy, live in self._bn_pairs:
            copy.assign(live)

    def count_images(self, batch):
        """Adds the global batch (per-replica batch x replicas) to `step`."""
        self.step.assign_add(tf.cast(batch * self.num_replicas, tf.int64))

    def classify(self, images, ema: bool = True, features: bool = False):
        """Float32 class probabilities for images in [-1, 1]: inference-mode BN with the live
        moving statistics, and the EMA weights unless ema=False. features: (probabilities,
        the net's pooled features) from the same pass."""
        net = self.ema_net if ema else self.net
        pooled, logits = net.features_and_logits(images, training=False)
        probs = tf.nn.softmax(tf.cast(logits, tf.float32))
        return (probs, tf.cast(pooled, tf.float32)) if features else probs

    def call(self, images, training=False):
        return self.ema_net(images, training=False)

    def report_hooks(self, run_dir: str, writes: bool = True) -> list:
        """Objects the trainer calls at each report: load_history(step) when a run resumes,
        report(trainer, step, kept, accuracy) -> a line to print (or None). writes=False: a
        non-chief worker's (they write no file). None by default (RealMix's --gamma=auto has
        one)."""
        del run_dir, writes
        return []

    # -- the step -----------------------------------------------------------------------------
    def train_step(self, data):
        """One step on one replica's batch. data = (labeled, unlabeled): labeled['image']
        f32[B,H,W,C], labeled['label'] int[B]; unlabeled['image'] f32[B*ratio,V,H,W,C] as
        declared by `self.unlabeled` (None when it is None). Returns {tag: float32 scalar}."""
        labeled, unlabeled = data
        batch = self.check_batch(labeled, unlabeled)
        step = tf.convert_to_tensor(self.step)
        # Drawn outside the compiled part (e.g. the Beta sampler has no XLA kernel).
        draws = self.draws(step, batch)
        grads, scalars = self._losses_and_gradients(labeled, unlabeled, step, draws)
        self.apply_update(grads)
        self.count_images(batch)
        return replicas.totals(scalars)

    def _loss_and_gradients(self, labeled, unlabeled, step, draws):
        with tf.GradientTape() as tape:
            loss, scalars = self.train_loss(labeled, unlabeled, step, draws)
            scaled_loss = self.scale_loss(loss)
        return tape.gradient(scaled_loss, self._trained), scalars

    def train_loss(self, labeled, unlabeled, step, draws):
        """(loss, {tag: scalar}) of this replica's batch, every value as this replica's share
        (libml/nn/replicas.py: mean, masked_mean, share; the shares of all replicas sum to the
        value). Runs inside the gradient tape: targets that must not be differentiated
        (label guesses, teachers) go through tf.stop_gradient."""
        raise NotImplementedError

    def draws(self, step, batch) -> dict:
        """The step's random draws, made before the compiled loss (none by default). Use
        `step_seeds` and `global_rows` so that R replicas draw what one device draws."""
        del step, batch
        return {}

    def check_batch(self, labeled, unlabeled):
        """The labeled batch size B (static if there is unlabeled data); ValueError if the
        unlabeled batch is not the declared [B*ratio, V, H, W, C]."""
        x = labeled["image"]
        batch = x.shape[0]
        if self.unlabeled is None:
            return batch if batch is not None else tf.shape(x)[0]
        u = None if unlabeled is None else unlabeled["image"]
        want = None if batch is None else (self.unlabeled.rows(batch), len(self.unlabeled.views))
        if want is None or u is None or tuple(u.shape[:2]) != want:
            raise ValueError(f"{type(self).__name__} needs a static labeled batch B and an "
                             f"unlabeled batch [B*{self.unlabeled.ratio}, "
                             f"{len(self.unlabeled.views)} views {self.unlabeled.views}, ...]: got "
                             f"labeled {x.shape}, unlabeled {None if u is None else u.shape} "
                             f"(batch the datasets with drop_remainder=True)")
        return batch

    def step_seeds(self, step, count: int = 2):
        """`count` stateless seeds of this step, from (seed, step): the same on every replica
        (global mode), so draws over the global rows agree; --replica_mode=per_replica: from
        (seed, step + replica), one set per replica, as the released code on several GPUs."""
        replica_id = 0 if replicas.synced(self.replica_mode) else replicas.replica_id()
        base = tf.stack([tf.constant(self.seed, tf.int64),
                         tf.cast(step, tf.int64) + tf.cast(replica_id, tf.int64)])
        return tf.unstack(tf.random.experimental.stateless_split(base, count))

    def step_seed(self, step):
        """The one stateless seed [seed, step (+ replica in per_replica mode)] of this step."""
        replica_id = 0 if replicas.synced(self.replica_mode) else replicas.replica_id()
        return tf.stack([tf.constant(self.seed, tf.int64),
                         tf.cast(step, tf.int64) + tf.cast(replica_id, tf.int64)])

    def global_rows(self, sample, rows: int):
        """This replica's `rows` rows of sample(rows * R), R = replicas in sync (global mode):
        R replicas draw what one device draws for the global batch. per_replica: sample(rows)."""
        if not replicas.synced(self.replica_mode):
            return sample(rows)
        count = replicas.num_replicas()
        whole = sample(rows * count)
        parts = tf.reshape(whole, [count, rows, *whole.shape[1:]])
        return tf.gather(parts, replicas.replica_id())
