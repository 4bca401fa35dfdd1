"""Helpers for tests that check the structure of a traced TensorFlow graph."""


def ancestors(op):
    """Every op that `op` waits for, through data and control inputs."""
    seen, stack = set(), [op]
    while stack:
        current = stack.pop()
        for parent in [i.op for i in current.inputs] + list(current.control_inputs):
            if parent not in seen:
                seen.add(parent)
                stack.append(parent)
    return seen


def traced_graph(fn, *args):
    """The graph of `fn` traced by `tf.function` for `args`."""
    import tensorflow as tf

    return tf.function(fn).get_concrete_function(*args).graph


def weight_gradient_op_types(model):
    """Counter of the op types that compute `model`'s weight gradients in one backward pass.

    Derived from the kernel choice each layer made (kernels, oneDNN, channel
    counts), not from one machine's: the filter gradient of each convolution
    (`cpu_kernels.filter_grad`'s matmuls or oneDNN's Conv2DBackpropFilter,
    or TensorFlow's own) and the fused BatchNorm gradient where the layer
    trains on its own unsynchronized kernels.
    """
    from collections import Counter

    import keras

    from fcn_tf.models import cpu_kernels, layers

    types = Counter()
    for layer in model.layers:
        if isinstance(layer, layers.Conv2D) and layer._fast_backward():
            k, c_in, c_out = layer.kernel_size[0], layer.kernel.shape[2], layer.kernel.shape[3]
            if cpu_kernels.onednn_filter_grad(k, c_in, c_out, layer._onednn):
                types["Conv2DBackpropFilter"] += 1
            else:
                rowwise = k > 1 and k * k * c_out >= cpu_kernels._FILTER_GRAD_ROWWISE_MIN_WIDTH
                types["MatMul"] += k if rowwise else 1
        elif isinstance(layer, keras.layers.Conv2D):
            types["Conv2DBackpropFilter"] += 1
        elif isinstance(layer, layers.BatchNorm) and not layer.synchronized:
            types["FusedBatchNormGradV3"] += 1
    return types
