"""`build_dataset`: the train and eval input pipelines as `tf.data`.

Train: the stream positions 0, 1, 2, ... of this input pipeline -> the
split index of each (`fcn_tf.data.order`: every epoch a fresh uniform
permutation of the pipeline's shard, the shards disjoint and covering the
split) -> that example read by random access (a prepared split through
its record offsets, `sources.random_access_split`; a `source` dataset
through `tf.data.experimental.at`) -> parallel deterministic map of the
reference augmentation with a per-example stateless seed derived from
(seed, pipeline id, position) -> batch per replica -> prefetch. Because
an element depends only on its position in the stream, `tf.train.Checkpoint(
iterator=...)` restores the stream exactly, and the iterator is
checkpointed symbolically: its saved state is the positions, a few
kilobytes, not the encoded or decoded examples in flight.

Eval: one pass, the image resized keeping its ratio to `eval_target` and
normalized, the label untouched at its original size, batch 1.

Sources yield dicts with `"image"` (uint8 (H, W, 3)) and `"label"` (uint8
(H, W)), or encoded `"image_bytes"` (JPEG/PNG) or `"image_strips"` +
`"strip_height"` (horizontal PNG strips, `fcn_tf.data.strips`) and
`"label_bytes"` (single-channel PNG of class ids), which are then decoded
inside the parallel map; `"image_id"` is optional.
"""

from __future__ import annotations

import tensorflow as tf

from fcn_tf.data import augment, order, records, strips


def decode_example(example: dict) -> tuple[tf.Tensor, tf.Tensor]:
    """Returns (image uint8 (H, W, 3), label uint8 (H, W)) of a source element.

    Args:
      example: a dict with "image"/"label" tensors or "image_bytes" (or
        "image_strips") / "label_bytes" encoded files (the label a
        single-channel PNG of class ids; palette PNGs would decode to
        colours).
    """
    if "image" in example:
        image = example["image"]
    elif "image_strips" in example:
        image = strips.decode_strips(example["image_strips"])
    else:
        image = tf.io.decode_image(example["image_bytes"], channels=3, expand_animations=False)
    return tf.ensure_shape(image, [None, None, 3]), decode_label(example)


def decode_label(example: dict) -> tf.Tensor:
    """The uint8 (H, W) label of a source element ("label" or "label_bytes")."""
    if "label" in example:
        label = example["label"]
    else:
        label = tf.io.decode_png(example["label_bytes"], channels=1)[..., 0]
    return tf.ensure_shape(label, [None, None])


def window_reader(example):
    """`(start, size) -> image window` that decodes only what the crop reads.

    PNG strips: only the strips the window meets (`strips.read_window`).
    JPEGs are decoded window only (`decode_and_crop_jpeg`); other formats
    are decoded whole and sliced. All give the same pixels as decoding
    everything and slicing.

    Args:
      example: a source element with "image_bytes" or "image_strips" and
        "strip_height".
    """
    if "image_strips" in example:
        return lambda start, size: strips.read_window(
            example["image_strips"], example["strip_height"], start, size
        )
    image_bytes = example["image_bytes"]

    def read(start, size):
        def jpeg():
            window = tf.concat([start, size], 0)
            return tf.io.decode_and_crop_jpeg(image_bytes, window, channels=3)

        def other():
            image = tf.io.decode_image(image_bytes, channels=3, expand_animations=False)
            return tf.slice(image, tf.concat([start, [0]], 0), tf.concat([size, [-1]], 0))

        return tf.ensure_shape(tf.cond(tf.io.is_jpeg(image_bytes), jpeg, other), [None, None, 3])

    return read


def _pipeline_ids(input_context) -> tuple[int, int]:
    if input_context is None:
        return 1, 0
    return input_context.num_input_pipelines, input_context.input_pipeline_id


def _random_access(source) -> records.RandomAccessSplit:
    """A `source` dataset (or RandomAccessSplit) as a RandomAccessSplit.

    `tf.data.experimental.at` reads element `i` directly from datasets that
    support random access (`from_tensor_slices`, `from_tensors`,
    `concatenate`, `map`, `range`, ...).
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
    (`fcn_tf.data.order`). `build_dataset` augments this stream.

    Args:
      data_config: a `fcn_tf.config.DataConfig` (dataset, split, seed).
      input_context: a `tf.distribute.InputContext`, or None for one pipeline.
      source: None (the prepared train split, `sources.random_access_split`),
        a `records.RandomAccessSplit`, or a finite `tf.data.Dataset` that
        supports `tf.data.experimental.at`.
    """
    if source is None:
        from fcn_tf.data import sources

        source = sources.random_access_split(data_config, data_config.train_split)
    split = _random_access(source)
    num_pipelines, pipeline_id = _pipeline_ids(input_context)
    # One sequential read per element (a seek and one record); the decode
    # and augmentation run after it in the parallel map.
    return order.training_order(split.num_examples, data_config.seed, num_pipelines, pipeline_id).flat_map(
        lambda position, index: split.read(index).map(lambda example: (position, example))
    )


def build_dataset(data_config, training: bool, input_context=None, source: tf.data.Dataset | None = None):
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
      source: the raw examples (see module docstring); defaults to the
        prepared train split (read by random access) or eval split (read
        in sorted order) of `data_config`. For training it must be finite
        and support `tf.data.experimental.at` (from_tensor_slices,
        from_tensors + concatenate, map, ...), or be a
        `records.RandomAccessSplit`.

    Returns:
      the `tf.data.Dataset`.
    """
    c = data_config
    num_pipelines, pipeline_id = _pipeline_ids(input_context)
    if training:
        batch = c.global_batch_size
        if input_context is not None:
            batch = input_context.get_per_replica_batch_size(c.global_batch_size)
        ds = training_examples(c, input_context, source)
        # The stream position seeds the augmentation: an element is a
        # function of its position alone.
        base_seed = tf.constant([c.seed, pipeline_id], tf.int64)

        def transform(position, example):
            seed = tf.random.experimental.stateless_fold_in(base_seed, position)
            label = decode_label(example)
            if "image" in example:
                return augment.train_transform(example["image"], label, seed, c)
            # Encoded source: the crop is planned on the label, then only the
            # image window it reads is decoded (JPEG) and resampled.
            return augment.train_transform(None, label, seed, c, read_window=window_reader(example))

        ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch, drop_remainder=True)
    else:
        if source is None:
            from fcn_tf.data import sources

            source = sources.encoded_split(c, c.eval_split)
        ds = source
        if num_pipelines > 1:
            ds = ds.shard(num_pipelines, pipeline_id)

        def transform(example):
            image, label = decode_example(example)
            image_id = example["image_id"] if "image_id" in example else tf.constant("")
            return {
                "image": augment.eval_transform(image, c),
                "label": tf.cast(label, tf.int32),
                "image_id": image_id,
            }

        ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(1)
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
