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
