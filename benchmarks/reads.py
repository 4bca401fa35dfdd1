"""Read throughput of the training input against the reads in flight (`data.reads_in_flight`).

Records of a prepared split are read as training reads them (the training
order, one record by its byte offset, `fcn_tf.data.pipeline.training_examples`),
without decoding or augmentation, so the figure is the reads alone. Shared
storage is simulated by a latency added to every read (a sleep, which holds
no core, as a read waiting on NFS, Lustre or GCS does); latency 0 is this
machine's local disk with the files in the page cache.

    python scripts/benchmark.py --what=reads
"""

from __future__ import annotations

import tempfile
import time

REQUIRED_PER_MACHINE = "8 GPUs need 160-560 images/s per machine (issue 21)"


def _delayed(split, latency_s: float):
    """`split` with `latency_s` added to every read."""
    import tensorflow as tf

    from fcn_tf.data import records

    def wait():
        time.sleep(latency_s)
        return 0

    def read(i):
        def after_wait(example):
            with tf.control_dependencies([tf.py_function(wait, [], tf.int32)]):
                return tf.nest.map_structure(tf.identity, example)

        return split.read(i).map(after_wait)

    return records.RandomAccessSplit(split.num_examples, read) if latency_s else split


def measure(data_config, split, reads: int, latency_ms: float, count: int, repeats: int) -> float:
    """Median records/s of `count` training reads with `reads` in flight."""
    import dataclasses

    from fcn_tf.data.pipeline import training_examples

    config = dataclasses.replace(data_config, reads_in_flight=reads)
    source = _delayed(split, latency_ms / 1000)
    times = []
    for _ in range(repeats + 1):  # the first pass warms up (tracing, page cache)
        stream = training_examples(config, source=source).take(count)
        start = time.perf_counter()
        for _ in stream:
            pass
        times.append(time.perf_counter() - start)
    times = sorted(times[1:])
    return count / times[len(times) // 2]


def main(reads=(1, 2, 4, 8, 16, 32), latencies_ms=(0.0, 2.0), count=256, repeats=3, log=print) -> list[dict]:
    """Prepares a VOC-sized synthetic split and prints records/s for each latency and reads in flight."""
    from fcn_tf.config import DataConfig
    from fcn_tf.data import sources, synthetic

    root = tempfile.mkdtemp(prefix="fcn_tf_reads_")
    synthetic.write_dataset(f"{root}/raw", num_train=64, num_val=1, height=375, width=500)
    sources.prepare("synthetic", f"{root}/raw", f"{root}/tfds", allow_count_mismatch=True)
    data_config = DataConfig(dataset="synthetic", data_dir=f"{root}/tfds")
    split = sources.random_access_split(data_config, "train")
    rows = []
    for latency in latencies_ms:
        for r in reads:
            rate = measure(data_config, split, r, latency, count, repeats)
            rows.append({"latency_ms": latency, "reads_in_flight": r, "records_per_s": rate})
            log(f"latency {latency:g} ms, {r} reads in flight: {rate:.0f} records/s")
    log("")
    log("| added latency per read | " + " | ".join(f"{r} in flight" for r in reads) + " |")
    log("| --- |" + " --- |" * len(reads))
    for latency in latencies_ms:
        rates = [row["records_per_s"] for row in rows if row["latency_ms"] == latency]
        log(f"| {latency:g} ms | " + " | ".join(f"{x:.0f}" for x in rates) + " |")
    log(f"records/s, one process; {REQUIRED_PER_MACHINE}")
    return rows


if __name__ == "__main__":
    main()
