"""Wide ResNet (WRN-28-2 by default) for Keras 3, as in the released libml code (spec §5).

The BatchNorm here has two switches the Keras layer lacks, both needed by MixMatch-style steps
(spec §6.4):
- `update_stats`: normalise with batch statistics without touching the moving statistics;
- `groups`: a batch made of G equal chunks is normalised chunk by chunk ("ghost batches"), so
  G forward passes that must each see their own batch statistics can run as one pass. The
  moving statistics, when updated, take the statistics of chunk 0 only.
"""
import math

import keras
import tensorflow as tf

from libml.nn import replicas

BN_MOMENTUM = 0.999
BN_EPSILON = 1e-3
LEAKY_SLOPE = 0.1


def scales_for_size(size: int) -> int:
    """Number of resolution stages for `size`-pixel images: ceil(log2(size)) - 2 (3 for 32 px)."""
    return int(math.ceil(math.log2(size))) - 2


def conv_initializer(seed: int):
    """He-normal, fan-out, untruncated: std = sqrt(2 / (k*k*filters_out)) (spec §5)."""
    return keras.initializers.VarianceScaling(
        scale=2.0, mode="fan_out", distribution="untruncated_normal", seed=seed)


class BatchNorm(keras.layers.Layer):
    """Batch normalisation over the channel (last) axis with an explicit moving-statistics policy.

    call(x, training, update_stats, groups):
      training=False: normalise with the moving statistics.
      training=True:  normalise each of `groups` equal chunks of the batch with its own biased
                      batch statistics; if update_stats, then
                      moving = momentum*moving + (1-momentum)*stat(chunk 0),
                      with the unbiased variance as in TF1's fused kernel.
    Statistics are computed in float32 whatever the compute dtype. Needs NHWC input.
    """

    def __init__(self, momentum=BN_MOMENTUM, epsilon=BN_EPSILON, cross_replica=True, **kwargs):
        super().__init__(**kwargs)
        self.momentum = momentum
        self.epsilon = epsilon
        self.cross_replica = bool(cross_replica)

    def build(self, input_shape):
        channels = (input_shape[-1],)
        self.gamma = self.add_weight(shape=channels, name="gamma", initializer="ones",
                                     autocast=False)
        self.beta = self.add_weight(shape=channels, name="beta", initializer="zeros",
                                    autocast=False)
        # Under a multi-replica strategy each replica updates its own copy (no synchronisation
        # inside the step, so it also works under XLA) and reads outside a replica average them.
        self.moving_mean = self._replica_local_weight("moving_mean", channels, "zeros")
        self.moving_variance = self._replica_local_weight("moving_variance", channels, "ones")

    def _replica_local_weight(self, name, shape, initializer):
        """A non-trainable float32 weight, sync-on-read with mean aggregation."""
        with keras.name_scope(self.name, caller=self):
            variable = keras.Variable(keras.initializers.get(initializer), shape=shape,
                                      dtype="float32", trainable=False, autocast=False,
                                      aggregation="mean", synchronization="on_read", name=name)
        self._track_variable(variable)
        return variable

    def call(self, x, training=False, update_stats=False, groups=1):
        if not training:
            return self._affine(x, self.moving_mean, self.moving_variance)
        if self.cross_replica and replicas.num_replicas() > 1:
            # Several replicas, global mode: each chunk's statistics over all replicas.
            y, mean, unbiased_variance = replicas.batch_norm(x, self.gamma, self.beta,
                                                             self.epsilon, groups)
            if update_stats:
                self._update_moving_stats(mean, unbiased_variance)
            return y
        # The fused kernel (one op forward, one backward) is much faster than moments + affine,
        # above all in bfloat16. It returns the unbiased variance, which is what TF1's fused
        # kernel fed the moving average (spec §5).
        chunks = tf.split(x, groups) if groups > 1 else [x]
        outputs = []
        for i, chunk in enumerate(chunks):
            y, mean, unbiased_variance = tf.compat.v1.nn.fused_batch_norm(
                chunk, self.gamma, self.beta, epsilon=self.epsilon, is_training=True)
            if update_stats and i == 0:
                self._update_moving_stats(mean, unbiased_variance)
            outputs.append(y)
        return tf.concat(outputs, axis=0) if groups > 1 else outputs[0]

    def _affine(self, x, mean, variance):
        scale = self.gamma * tf.math.rsqrt(variance + self.epsilon)
        offset = self.beta - mean * scale
        return x * tf.cast(scale, x.dtype) + tf.cast(offset, x.dtype)

    def _update_moving_stats(self, mean, variance):
        rate = 1.0 - self.momentum
        self.moving_mean.assign(self.moving_mean * self.momentum + mean * rate)
        self.moving_variance.assign(self.moving_variance * self.momentum + variance * rate)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


def leaky_relu(x):
    return tf.nn.leaky_relu(x, alpha=LEAKY_SLOPE)


class ResidualBlock(keras.layers.Layer):
    """Pre-activation residual block: BN-LReLU-conv3x3(stride)-BN-LReLU-conv3x3, plus a 1x1
    projection shortcut when the channel count changes. With activate_before_residual the
    shortcut starts from the activated input (first stage only), else from the raw input."""

    def __init__(self, in_channels, filters, stride=1, activate_before_residual=False,
                 seed=0, bn_momentum=BN_MOMENTUM, cross_replica=True, **kwargs):
        super().__init__(**kwargs)
        self.activate_before_residual = activate_before_residual
        policy = kwargs.get("dtype")
        bn = dict(cross_replica=cross_replica, dtype=policy)
        self.bn1 = BatchNorm(bn_momentum, name="bn1", **bn)
        self.conv1 = keras.layers.Conv2D(filters, 3, strides=stride, padding="same",
                                         kernel_initializer=conv_initializer(seed),
                                         dtype=policy, name="conv1")
        self.bn2 = BatchNorm(bn_momentum, name="bn2", **bn)
        self.conv2 = keras.layers.Conv2D(filters, 3, padding="same",
                                         kernel_initializer=conv_initializer(seed + 1),
                                         dtype=policy, name="conv2")
        self.shortcut = None
        if in_channels != filters:
            self.shortcut = keras.layers.Conv2D(filters, 1, strides=stride, padding="same",
                                                kernel_initializer=conv_initializer(seed + 2),
                                                dtype=policy, name="shortcut")

    def call(self, x0, training=False, update_bn_stats=False, bn_groups=1):
        bn = dict(training=training, update_stats=update_bn_stats, groups=bn_groups)
        x = leaky_relu(self.bn1(x0, **bn))
        if self.activate_before_residual:
            x0 = x
        x = self.conv1(x)
        x = self.conv2(leaky_relu(self.bn2(x, **bn)))
        if self.shortcut is not None:
            x0 = self.shortcut(x0)
        return x0 + x


class WideResNet(keras.Model):
    """The libml "resnet": stem conv 16, `scales` stages of `repeat` blocks with
    `filters << stage` channels (stride 2 from stage 1), BN-LReLU, global average pool, dense.

    call(x, training=False, update_bn_stats=None, bn_groups=1): x in [-1, 1], [N, H, W, C];
    returns float32 logits [N, nclass]. BN uses batch statistics when `training`; the moving
    statistics are updated only when `update_bn_stats` (default: `training`), from chunk 0 of
    the `bn_groups` equal chunks of the batch (see BatchNorm).
    `dtype` takes a Keras dtype policy ("float32", "mixed_bfloat16", "mixed_float16"); the
    logits are float32 under every policy. `seed` makes the initial weights reproducible.
    `bn_momentum`: moving = bn_momentum*moving + (1-bn_momentum)*batch (0.999 released).
    """

    def __init__(self, nclass, filters=32, repeat=4, scales=3, seed=0, dtype=None,
                 bn_momentum=BN_MOMENTUM, cross_replica_bn=True, name="wide_resnet", **kwargs):
        super().__init__(name=name, dtype=dtype, **kwargs)
        self.nclass = nclass
        self.filters, self.repeat, self.scales = filters, repeat, scales
        self.bn_momentum = bn_momentum
        policy = self.dtype_policy
        layer_seed = seed * 1000
        self.stem = keras.layers.Conv2D(16, 3, padding="same",
                                        kernel_initializer=conv_initializer(layer_seed),
                                        dtype=policy, name="stem")
        self.blocks = []
        channels = 16
        for scale in range(scales):
            for i in range(repeat):
                layer_seed += 3
                first = i == 0
                self.blocks.append(ResidualBlock(
                    channels, filters << scale, stride=2 if (first and scale) else 1,
                    activate_before_residual=first and scale == 0, seed=layer_seed,
                    bn_momentum=bn_momentum, cross_replica=cross_replica_bn, dtype=policy,
                    name=f"block{scale}_{i}"))
                channels = filters << scale
        self.final_bn = BatchNorm(bn_momentum, cross_replica=cross_replica_bn, dtype=policy,
                                  name="final_bn")
        self.classifier = keras.layers.Dense(
            nclass, kernel_initializer=keras.initializers.GlorotNormal(seed=layer_seed + 3),
            dtype="float32", name="classifier")

    def call(self, x, training=False, update_bn_stats=None, bn_groups=1):
        return self.features_and_logits(x, training, update_bn_stats, bn_groups)[1]

    def features_and_logits(self, x, training=False, update_bn_stats=None, bn_groups=1):
        """(pooled features [N, filters << (scales - 1)], logits): the classifier's input too,
        from the same pass (the OOD score of --gamma=auto, realmix_tf/ood_share.py)."""
        if update_bn_stats is None:
            update_bn_stats = training
        bn = dict(training=training, update_bn_stats=update_bn_stats, bn_groups=bn_groups)
        y = self.stem(x)
        for block in self.blocks:
            y = block(y, **bn)
        y = leaky_relu(self.final_bn(y, training=training, update_stats=update_bn_stats,
                                     groups=bn_groups))
        y = tf.reduce_mean(y, axis=[1, 2])
        return y, self.classifier(y)

    def kernels(self):
        """The variables decoupled weight decay applies to: conv and dense kernels only."""
        return [v for v in self.trainable_variables if v.path.endswith("kernel")]

    def bn_layers(self):
        layers = []
        for block in self.blocks:
            layers += [block.bn1, block.bn2]
        return layers + [self.final_bn]

    def build_for(self, input_shape):
        """Creates the variables for images of `input_shape` (H, W, C)."""
        self(tf.zeros((1, *input_shape), dtype=tf.float32))
        return self

    def get_config(self):
        return {"nclass": self.nclass, "filters": self.filters, "repeat": self.repeat,
                "scales": self.scales, "bn_momentum": self.bn_momentum, "name": self.name}
