"""The order of the training stream: a fresh uniform permutation of the split every epoch.

The reference (PyTorch `DataLoader(shuffle=True)`) draws every epoch as a
uniformly random permutation of the whole split. A shuffle buffer cannot:
it mixes only a window of the stored order, and the builders store each
split sorted by id, which on Cityscapes (ids start with the city) and
ADE20k (ids grouped by scene) makes every batch come from a narrow slice
of the data. It also keeps the window of encoded examples in memory and in
every iterator checkpoint.

Here the order is a function of the stream position alone: position `t` of
input pipeline `k` (of `w`) lies in epoch `e = t // m`, where `m` is the
size of shard `k` (the split's indices `k, k + w, k + 2w, ...`, so the
shards are disjoint and cover the split), and reads example
`k + w * index_shuffle(t % m, key(seed, k, e), m - 1)`.
`tf.random.experimental.index_shuffle` is a stateless pseudo-random
bijection of `[0, m - 1]`, so each epoch is a permutation of the shard, a
new one each epoch, reproducible from the seed, independent of the stored
order; the pipeline state is one counter, whatever the split size.
"""

from __future__ import annotations

import tensorflow as tf

# Keeps the permutation keys apart from the augmentation seeds, which are
# also derived from (seed, pipeline id).
_ORDER_STREAM = 0x6F72646572


def shard_size(num_examples: int, num_shards: int, shard: int) -> int:
    """Examples of shard `shard` of `num_shards` (indices shard, shard + num_shards, ...).

    Args:
      num_examples: examples in the split.
      num_shards: input pipelines.
      shard: this pipeline's id, 0 <= shard < num_shards.
    """
    return len(range(shard, num_examples, num_shards))


def epoch_key(seed: int, shard: int, epoch) -> tf.Tensor:
    """The int64 [2] `index_shuffle` key of one shard's epoch.

    Args:
      seed: DataConfig.seed.
      shard: the input pipeline id.
      epoch: int64 scalar tensor.
    """
    base = tf.constant([seed, _ORDER_STREAM], tf.int64)
    key = tf.random.experimental.stateless_fold_in(base, shard)
    return tf.random.experimental.stateless_fold_in(key, epoch)


def example_index(position, num_examples: int, seed: int, num_shards: int = 1, shard: int = 0) -> tf.Tensor:
    """The split index (int64) read at stream position `position` of pipeline `shard`.

    Args:
      position: int64 scalar tensor, the element's position in this
        pipeline's stream (0, 1, 2, ...).
      num_examples: examples in the split.
      seed: DataConfig.seed.
      num_shards: input pipelines.
      shard: this pipeline's id.
    """
    size = shard_size(num_examples, num_shards, shard)
    position = tf.cast(position, tf.int64)
    epoch = position // size
    within = tf.random.experimental.index_shuffle(
        position % size, epoch_key(seed, shard, epoch), tf.constant(size - 1, tf.int64)
    )
    return shard + num_shards * within


def training_order(num_examples: int, seed: int, num_shards: int = 1, shard: int = 0) -> tf.data.Dataset:
    """The infinite stream of `(position, split index)` int64 pairs of one input pipeline.

    Args:
      num_examples: examples in the split.
      seed: DataConfig.seed.
      num_shards: input pipelines.
      shard: this pipeline's id.

    Raises:
      ValueError: the split has fewer examples than there are pipelines.
    """
    if not 0 <= shard < num_shards:
        raise ValueError(f"input pipeline id {shard} is not in 0..{num_shards - 1}")
    if num_examples < num_shards:
        raise ValueError(
            f"the training split has {num_examples} examples, fewer than the {num_shards} input pipelines: "
            "every pipeline needs at least one"
        )
    return tf.data.Dataset.range(tf.int64.max).map(
        lambda t: (t, example_index(t, num_examples, seed, num_shards, shard))
    )
