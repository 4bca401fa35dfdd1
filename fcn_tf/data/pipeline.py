"""`build_dataset`: the train and eval input pipelines as `tf.data`.

Train: shard per input pipeline -> shuffle (seeded) -> repeat -> enumerate
-> parallel deterministic map of the reference augmentation with a
per-example stateless seed derived from (seed, pipeline id, element index)
-> batch per replica -> prefetch. Because the randomness of an example
depends only on its position in the stream, `tf.train.Checkpoint(
iterator=...)` restores the stream exactly (the shuffle buffer and position
are part of the iterator state).

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

from fcn_tf.data import augment, strips


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


def _encoded_split(sources, data_config, split):
    """A prepared split with image and label left encoded, decoded after the shuffle.

    The shuffle buffer (and so every iterator checkpoint, which stores it)
    then holds JPEG/PNG bytes instead of decoded pixels: about 10x less for
    VOC, 3-4x less for Cityscapes.
    """
    import tensorflow_datasets as tfds

    skip = {"image": tfds.decode.SkipDecoding(), "label": tfds.decode.SkipDecoding()}
    ds = sources.load_split(data_config, split, decoders=skip)

    def rename(e):
        out = {"label_bytes": e["label"], "image_id": e["image_id"]}
        if "image_strips" in e:
            out.update(image_strips=e["image_strips"], strip_height=e["strip_height"])
        else:
            out["image_bytes"] = e["image"]
        return out

    return ds.map(rename, num_parallel_calls=tf.data.AUTOTUNE)


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
      source: the raw examples (see module docstring); defaults to
        `fcn_tf.data.sources.load_split` of the train or eval split.

    Returns:
      the `tf.data.Dataset`.
    """
    c = data_config
    if source is None:
        from fcn_tf.data import sources

        source = _encoded_split(sources, c, c.train_split if training else c.eval_split)
    num_pipelines, pipeline_id = _pipeline_ids(input_context)
    ds = source
    if num_pipelines > 1:
        # Shard before shuffling so the shards are disjoint and fixed.
        ds = ds.shard(num_pipelines, pipeline_id)

    if training:
        batch = c.global_batch_size
        if input_context is not None:
            batch = input_context.get_per_replica_batch_size(c.global_batch_size)
        ds = ds.shuffle(c.shuffle_buffer, seed=c.seed, reshuffle_each_iteration=True)
        ds = ds.repeat().enumerate()
        base_seed = tf.constant([c.seed, pipeline_id], tf.int64)

        def transform(index, example):
            seed = tf.random.experimental.stateless_fold_in(base_seed, index)
            label = decode_label(example)
            if "image" in example:
                return augment.train_transform(example["image"], label, seed, c)
            # Encoded source: the crop is planned on the label, then only the
            # image window it reads is decoded (JPEG) and resampled.
            return augment.train_transform(None, label, seed, c, read_window=window_reader(example))

        ds = ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.batch(batch, drop_remainder=True)
    else:

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
    if input_context is not None:
        # We shard ourselves; tf.distribute must not shard again.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options)
