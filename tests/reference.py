"""Independent references shared by the step tests: a cloned network and numpy softmax."""
import numpy as np

from libml.nn.wrn import WideResNet


def clone_network(net, input_shape):
    """An independent WideResNet with the current weights and BN statistics of `net`."""
    ref = WideResNet(net.nclass, filters=net.filters, repeat=net.repeat, scales=net.scales,
                     name="ref").build_for(input_shape)
    for r, v in zip(ref.weights, net.weights):
        r.assign(v)
    return ref


def softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)
