"""The exported inference model: the trained Wide ResNet rebuilt from standard Keras layers.

`build(net, image_shape)` returns a functional `keras.Model` made only of Keras' own layers
(Rescaling, Conv2D, BatchNormalization, LeakyReLU, Add, GlobalAveragePooling2D, Dense,
Softmax), holding `net`'s weights and BN moving statistics, all float32. So

    model = keras.models.load_model("model.keras")      # nothing of this project needed
    probabilities = model.predict(images)               # images: [N, H, W, C], values 0..255

works in any Python with Keras 3 (and `model.export(...)` gives TF Serving a SavedModel).

Input:  "images", float32 [N, H, W, C] with pixel values in [0, 255] (uint8 arrays are fine);
        the training scaling x * 2/255 - 1 is the first layer ("scale"). Images must be
        prepared as training prepared them: libml/data/images.py (shorter side resized to H,
        centre crop, EXIF rotation, 8-bit).
Output: "probabilities", float32 [N, nclass] (softmax of the "logits" layer's output).

Layer names follow the Wide ResNet's: stem, block{s}_{i}_{bn1,conv1,bn2,conv2,shortcut},
final_bn, classifier; `layer_pairs` is the one table of that correspondence (export and
transfer learning from a .keras file both use it).
"""
from typing import List, Tuple

import keras
import numpy as np

from libml.nn.wrn import LEAKY_SLOPE

F32 = "float32"
INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
LOGITS_NAME = "classifier"


def layer_pairs(net) -> List[Tuple[str, object]]:
    """(plain layer name, the net's layer) for every layer holding weights, in net.weights
    order (stem, blocks, final BN, classifier)."""
    pairs = [("stem", net.stem)]
    for block in net.blocks:
        parts = [("bn1", block.bn1), ("conv1", block.conv1), ("bn2", block.bn2),
                 ("conv2", block.conv2)]
        if block.shortcut is not None:
            parts.append(("shortcut", block.shortcut))
        pairs += [(f"{block.name}_{part}", layer) for part, layer in parts]
    return pairs + [("final_bn", net.final_bn), (LOGITS_NAME, net.classifier)]


def _weights(layer) -> List[np.ndarray]:
    """A layer's weights as float32 arrays; BN as [gamma, beta, moving_mean, moving_variance]."""
    if hasattr(layer, "moving_mean"):
        variables = [layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance]
    else:
        variables = layer.weights
    return [np.asarray(keras.ops.convert_to_numpy(v), np.float32) for v in variables]


def build(net, image_shape, name: str = "wide_resnet_classifier") -> keras.Model:
    """The inference model of `net` (a built WideResNet) for images of `image_shape` (H, W, C)."""
    layers = {}

    def conv(layer_name, source):
        layers[layer_name] = keras.layers.Conv2D(
            source.filters, source.kernel_size, strides=source.strides, padding=source.padding,
            use_bias=source.use_bias, dtype=F32, name=layer_name)
        return layers[layer_name]

    def bn_relu(layer_name, source, x):
        layers[layer_name] = keras.layers.BatchNormalization(
            epsilon=source.epsilon, momentum=source.momentum, dtype=F32, name=layer_name)
        x = layers[layer_name](x)
        return keras.layers.LeakyReLU(negative_slope=LEAKY_SLOPE, dtype=F32,
                                      name=f"{layer_name}_lrelu")(x)

    inputs = keras.Input(tuple(int(d) for d in image_shape), dtype=F32, name=INPUT_NAME)
    x = keras.layers.Rescaling(2.0 / 255, offset=-1.0, dtype=F32, name="scale")(inputs)
    x = conv("stem", net.stem)(x)
    for block in net.blocks:
        prefix = block.name
        x0 = x
        y = bn_relu(f"{prefix}_bn1", block.bn1, x)
        if block.activate_before_residual:
            x0 = y
        y = conv(f"{prefix}_conv1", block.conv1)(y)
        y = bn_relu(f"{prefix}_bn2", block.bn2, y)
        y = conv(f"{prefix}_conv2", block.conv2)(y)
        if block.shortcut is not None:
            x0 = conv(f"{prefix}_shortcut", block.shortcut)(x0)
        x = keras.layers.Add(dtype=F32, name=f"{prefix}_add")([x0, y])
    x = bn_relu("final_bn", net.final_bn, x)
    x = keras.layers.GlobalAveragePooling2D(dtype=F32, name="pool")(x)
    layers[LOGITS_NAME] = keras.layers.Dense(net.nclass, dtype=F32, name=LOGITS_NAME)
    logits = layers[LOGITS_NAME](x)
    outputs = keras.layers.Softmax(dtype=F32, name=OUTPUT_NAME)(logits)
    model = keras.Model(inputs, outputs, name=name)
    for layer_name, source in layer_pairs(net):
        layers[layer_name].set_weights(_weights(source))
    return model


def weights_for(net, plain: keras.Model, skip: Tuple[str, ...] = ()) -> List[Tuple[object, np.ndarray]]:
    """(variable of `net`, array from `plain`) for every weight of `net` outside the layers
    named in `skip`: the inverse of `build`, used to start training from an exported .keras
    file. A plain model of another architecture is a KeyError/ValueError naming the first
    mismatch."""
    pairs = []
    for layer_name, layer in layer_pairs(net):
        if layer_name in skip:
            continue
        try:
            arrays = plain.get_layer(layer_name).get_weights()
        except ValueError:
            raise KeyError(f"no layer {layer_name}") from None
        variables = ([layer.gamma, layer.beta, layer.moving_mean, layer.moving_variance]
                     if hasattr(layer, "moving_mean") else layer.weights)
        if len(arrays) != len(variables):
            raise ValueError(f"{layer_name} has {len(arrays)} weights, this model {len(variables)}")
        for variable, array in zip(variables, arrays):
            if tuple(variable.shape) != tuple(array.shape):
                raise ValueError(f"{layer_name} is {tuple(array.shape)}, this model needs "
                                 f"{tuple(variable.shape)}")
            pairs.append((variable, array))
    return pairs


class LogitsNet:
    """A plain model in the trainer's convention: input x in [-1, 1], output logits, `.nclass`
    (for tools written against the WideResNet, e.g. realmix_tf.outliers)."""

    def __init__(self, plain: keras.Model):
        head = plain.get_layer(LOGITS_NAME)
        self.model = keras.Model(plain.input, head.output)
        self.both = keras.Model(plain.input, [head.input, head.output])
        self.nclass = int(self.model.output_shape[-1])

    def __call__(self, x, training=False):
        return self.model((x + 1.0) * (255.0 / 2), training=training)

    def features_and_logits(self, x, training=False):
        """(the classifier's input, logits), as WideResNet.features_and_logits."""
        features, logits = self.both((x + 1.0) * (255.0 / 2), training=training)
        return features, logits
