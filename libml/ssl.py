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
by every algorithm are checked by the same check functions as their flags (libml/config.py).

A subclass implements `train_step(data)` and returns its scalars keyed by TensorBoard tag;
`from_config(info, config)` builds it for the trainer.
"""
import keras
import tensorflow as tf

from libml import replicas

from libml.config import PRECISIONS, decay, non_negative, one_of, positive
from libml.errors import UserError
from libml.models import WideResNet, scales_for_size


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


def define_loss_nclass_flag(flag_values) -> None:
    """--loss_nclass (idempotent), for the algorithms with a class-averaged unlabeled loss."""
    from absl import flags
    if "loss_nclass" not in flag_values:
        flags.DEFINE_integer("loss_nclass", 0, LOSS_NCLASS_HELP, flag_values=flag_values)


def check_settings(precision, ema, bn_momentum, lr, wd):
    """The shared settings, checked with the same functions as their trainer flags."""
    one_of(*PRECISIONS)("precision", precision)
    decay("ema", ema)
    decay("bn_momentum", bn_momentum)
    positive("lr", lr)
    non_negative("pass a weight decay >= 0")("wd", wd)


class SSLModel(keras.Model):
    """Base for RealMix and the baselines. Create it under `strategy.scope()`."""

    uses_unlabeled = True    # False: the trainer feeds a constant placeholder unlabeled stream

    def __init__(self, nclass, input_shape, filters=32, repeat=4, scales=0, lr=0.002, wd=0.02,
                 ema=0.999, seed=0, precision="float32", jit_compile=False, bn_momentum=0.999,
                 replica_mode=replicas.GLOBAL, name=None):
        super().__init__(name=name or type(self).__name__.lower())
        check_settings(precision, ema, bn_momentum, lr, wd)
        one_of(*replicas.REPLICA_MODES)("replica_mode", replica_mode)
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
        self._ema_pairs = list(zip(self.ema_net.trainable_variables, self.net.trainable_variables))
        self._bn_pairs = [(e, n) for le, ln in zip(self.ema_net.bn_layers(), self.net.bn_layers())
                          for e, n in ((le.moving_mean, ln.moving_mean),
                                       (le.moving_variance, ln.moving_variance))]
        self._decayed = self.net.kernels()
        for shadow, var in self._ema_pairs + self._bn_pairs:
            shadow.assign(var)

        optimizer = keras.optimizers.Adam(learning_rate=self.lr, epsilon=1e-8)
        if precision == "mixed_float16":
            optimizer = keras.optimizers.LossScaleOptimizer(optimizer)
        optimizer.build(self.net.trainable_variables)
        self.optimizer = optimizer
        self.step = keras.Variable(0, dtype="int64", trainable=False, name="step",
                                   aggregation="only_first_replica")

    @classmethod
    def check_hparams(cls, **hparams):
        """The constructor's checks of the algorithm's keyword arguments, without building
        anything (the registry runs them before the data are read). Each subclass checks its
        own arguments and passes the others up; the shared settings are the config's."""
        del hparams

    @classmethod
    def from_config(cls, info, config, **kwargs):
        """The model of a run: dataset metadata (nclass, shape) and the config's settings."""
        return cls(info.nclass, info.shape, **config.model_kwargs(), **kwargs)

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
        """The loss to differentiate: this replica's share of the loss (libml/replicas.py: the
        shares of all replicas sum to the loss, and the optimizer sums their gradients),
        scaled by the LossScaleOptimizer under float16."""
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            loss = self.optimizer.scale_loss(loss)
        return loss

    def maybe_jit(self, fn):
        """fn compiled with XLA under jit_compile, else fn itself, traced with the step (a
        nested tf.function could not hold the step's cross-replica collectives)."""
        return tf.function(fn, jit_compile=True) if self.use_jit else fn

    def gradients(self, tape, scaled_loss):
        """Gradients of `scaled_loss` (= self.scale_loss(loss), computed inside the tape)."""
        return tape.gradient(scaled_loss, self.net.trainable_variables)

    def apply_update(self, grads):
        """Adam step, then kernel-only decoupled weight decay, then the EMA update. A step that
        the float16 loss scaler skips (non-finite gradients) skips all three."""
        decay, ema_rate = 1.0 - self.wd * self.lr, 1.0 - self.ema_decay
        if isinstance(self.optimizer, keras.optimizers.LossScaleOptimizer):
            # The inner optimizer counts only the steps it applied.
            counter = tf_variable(self.optimizer.inner_optimizer.iterations)
            before = counter.read_value()
            self.optimizer.apply_gradients(zip(grads, self.net.trainable_variables))
            applied = tf.cast(counter.read_value() > before, tf.float32)
            decay, ema_rate = 1.0 - applied * (self.wd * self.lr), applied * ema_rate
        else:
            self.optimizer.apply_gradients(zip(grads, self.net.trainable_variables))

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

    def train_step(self, data):
        raise NotImplementedError
