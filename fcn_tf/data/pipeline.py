"""`build_dataset`: the train and eval input pipelines as `tf.data`.

Every source yields examples in the one encoded shape (`fcn_tf.data.encoded`:
the image as encoded strips, the label a PNG, the id), decoded inside the
parallel map by that module only; the examples of a source of decoded
arrays are encoded as they are read (`encoded.adapt`).

Train: the stream positions 0, 1, 2, ... of this input pipeline -> the
split index of each (`fcn_tf.data.order`: every epoch a fresh uniform
permutation of the pipeline's shard, the shards disjoint and covering the
split) -> that example read by random access (a prepared split through
its record offsets, `sources.random_access_split`; a `source` dataset
through `tf.data.experimental.at`), `data.reads_in_flight` reads at once
in a deterministic parallel map -> parallel deterministic map of the
reference augmentation with a per-example stateless seed derived from
(seed, pipeline id, position), the crop planned on the label and only the
image window it reads decoded -> batch per replica -> prefetch. Because
an element depends only on its position in the stream, `tf.train.Checkpoint(
iterator=...)` restores the stream exactly, and the iterator is
checkpointed symbolically: its saved state is the positions, a few
kilobytes, not the encoded or decoded examples in flight.

Eval: one pass over the split in stored (sorted id) order
(`sources.encoded_split`), sharded by input pipeline; the image resized
keeping its ratio to `eval_target` and normalized, the label untouched at
its original size, batch 1.
"""

from __future__ import annotations

import tensorflow as tf

from fcn_tf.data import augment, encoded, order, records, sources


def _pipeline_ids(input_context) -> tuple[int, int]:
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


def _random_access(source) -> records.RandomAccessSplit:
    """A `source` dataset (or RandomAccessSplit) as a RandomAccessSplit.

    `tf.data.experimental.at` reads element `i` directly from datasets that
    support random access (`from_tensor_slices`, `from_tensors`,
    `concatenate`, `map`, `range`, ...). Through a `map` whose function
    computes something, TensorFlow 2.21 crashes (segmentation fault) once a
    second pipeline reads the same source object, e.g. a test comparing two
    runs: sources are best built from slices (`encoded.from_files` takes n
    examples at once).
    """
    if isinstance(source, records.RandomAccessSplit):
        return source
    count = int(source.cardinality())
    if count < 0:
        raise ValueError(
            "a training source must have a known, finite number of elements (tf.data cardinality "
            f"{count}): the training order permutes its indices"
        )
    return records.RandomAccessSplit(
        count, lambda i: tf.data.Dataset.from_tensors(tf.data.experimental.at(source, i))
    )


def training_examples(data_config, input_context=None, source=None) -> tf.data.Dataset:
    """The raw training stream of one input pipeline: `(position, example)`, in the training order.

    Position `t` (int64) reads split index `order.example_index(t, ...)`:
    every epoch a fresh uniform permutation of this pipeline's shard
    (`fcn_tf.data.order`); the example is in the encoded shape
    (`fcn_tf.data.encoded`). `build_dataset` augments this stream.

    Args:
      data_config: a `fcn_tf.config.DataConfig` (dataset, split, seed).
      input_context: a `tf.distribute.InputContext`, or None for one pipeline.
      source: None (the prepared train split, `sources.random_access_split`),
        a `records.RandomAccessSplit`, or a finite `tf.data.Dataset` (of
        encoded examples or decoded arrays) that supports
        `tf.data.experimental.at`.
    """
    if source is None:
        source = sources.random_access_split(data_config, data_config.train_split)
    split = _random_access(source)
    num_pipelines, pipeline_id = _pipeline_ids(input_context)
    # One read per element (a seek and one record), `reads_in_flight` of them
    # at once: on shared storage a record takes milliseconds to arrive. A
    # deterministic parallel map yields them in the order of the positions, as
    # one read at a time would, and its checkpoint is still the positions.
    # (Not a parallel interleave of the one-record datasets: in TensorFlow 2.21
    # its iterator restored from a symbolic checkpoint hangs at the first
    # element. tf.data logs that the read is "stateful" when it checks the
    # pipeline: the record read is a pure function of its index here.)
    # Decode and augmentation run after it in the parallel map below.
    reads = data_config.reads_in_flight

    def read(position, index):
        example = split.read(index).get_single_element()
        return position, encoded.adapt(example)

    return order.training_order(split.num_examples, data_config.seed, num_pipelines, pipeline_id).map(
        read, num_parallel_calls=reads, deterministic=True
    )


def _train_dataset(c, input_context, source) -> tf.data.Dataset:
    batch = c.global_batch_size
    if input_context is not None:
        batch = input_context.get_per_replica_batch_size(c.global_batch_size)
    # The stream position seeds the augmentation: an element is a function
    # of its position alone.
    base_seed = tf.constant([c.seed, _pipeline_ids(input_context)[1]], tf.int64)

    def transform(position, example):
        seed = tf.random.experimental.stateless_fold_in(base_seed, position)
        # The crop is planned on the label, then only the image window it
        # reads is decoded and resampled.
        return augment.train_transform(
            None,
            encoded.decode_label(example),
            seed,
            c,
            read_window=lambda start, size: encoded.read_window(example, start, size),
        )

    ds = training_examples(c, input_context, source)
    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(batch, drop_remainder=True)


def _eval_dataset(c, input_context, source, max_examples: int) -> tf.data.Dataset:
    ds = source if source is not None else sources.encoded_split(c, c.eval_split)
    if max_examples:
        ds = ds.take(max_examples)
    num_pipelines, pipeline_id = _pipeline_ids(input_context)
    if num_pipelines > 1:
        ds = ds.shard(num_pipelines, pipeline_id)

    def transform(example):
        example = encoded.decode(encoded.adapt(example))
        return {
            "image": augment.eval_transform(example["image"], c),
            "label": tf.cast(example["label"], tf.int32),
            "image_id": example["image_id"],
        }

    ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.batch(1)


def build_dataset(
    data_config,
    training: bool,
    input_context=None,
    source: tf.data.Dataset | None = None,
    max_examples: int = 0,
):
    """Builds the train or eval `tf.data.Dataset` of an experiment.

    Args:
      data_config: a `fcn_tf.config.DataConfig`.
      training: True for the infinite, shuffled, augmented train stream
        of `(images float32 (b, crop_h, crop_w, 3), labels int32 (b, crop_h,
        crop_w))`; False for one pass of `{"image": float32 (1, h', w', 3),
        "label": int32 (1, H, W), "image_id": string (1,)}`.
      input_context: a `tf.distribute.InputContext` (from
        `distribute_datasets_from_function`): the source is sharded by input
        pipeline and batched per replica. None: one pipeline, global batch.
      source: the raw examples, encoded (`fcn_tf.data.encoded`) or decoded
        arrays; defaults to the prepared train split (read by random
        access) or eval split (read in sorted order) of `data_config`. For
        training it must be finite and support `tf.data.experimental.at`
        (from_tensor_slices, from_tensors + concatenate, map, ...), or be a
        `records.RandomAccessSplit`.
      max_examples: eval only: the first `max_examples` examples of the
        source, before sharding (0: all).

    Returns:
      the `tf.data.Dataset`.
    """
    if training and max_examples:
        raise ValueError("max_examples limits the evaluation pass; the training stream is infinite")
    if training:
        ds = _train_dataset(data_config, input_context, source)
    else:
        ds = _eval_dataset(data_config, input_context, source, max_examples)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.deterministic = True
    if training:
        # Every element is a function of its stream position (order and
        # augmentation seeds alike), so a checkpoint need only hold the
        # positions, not the decoded crops in flight in the map and prefetch
        # buffers: a few kilobytes, whatever the split and batch size.
        options.experimental_symbolic_checkpoint = True
    if input_context is not None:
        # We shard ourselves; tf.distribute must not shard again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)
