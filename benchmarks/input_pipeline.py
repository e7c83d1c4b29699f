"""Input-pipeline benchmark: CPU-ms per image and images/s at 224 (eval and train ops).

Data: real photos bundled with scikit-image, cropped/resized to ImageNet-like sizes
(333-500 px sides, JPEG quality 90), prepared into a real TFDS ArrayRecord ``imagenet2012``
through our TF-free builder (fake ILSVRC2012 tars from ``tests/data_fixtures.py``).

Two measurements per op chain:

* ``cpu-ms/img``: single thread, ``time.process_time`` over all images, preprocessing only
  (record already read) -- comparable to the tf.data figure (decode_and_crop_jpeg + resize:
  ~1.1 CPU-ms/img measured on this machine by the issue author).
* ``img/s``: the full grain pipeline (``create_train_iter`` / ``create_eval_iter``: ArrayRecord
  read + preprocessing in ``num_threads`` threads + batching), wall clock, all cores, and its
  CPU cost per image (process CPU time / images).

Usage::

    python benchmarks/input_pipeline.py [--images 512] [--threads 4] [--batches 20]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

TF_DATA_CPU_MS = 1.1  # tf.data decode_and_crop_jpeg, per the issue (same machine)


def _cpu_ms(pre, records, reps: int = 1) -> float:
    t = time.process_time()
    for _ in range(reps):
        for i, r in enumerate(records):
            pre.apply(r["image"], np.random.default_rng(i))
    return (time.process_time() - t) / (reps * len(records)) * 1e3


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="train images in the fake dataset")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--workdir", default=None)
    args = ap.parse_args(argv)

    import cv2
    import data_fixtures

    from halluvit_jax.data import config as config_lib
    from halluvit_jax.data import ops, pipeline, tfds_utils

    work = args.workdir or tempfile.mkdtemp(prefix="halluvit_bench_")
    per_class = max(1, args.images // len(data_fixtures.SYNSETS))
    data_dir = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data_dir, "imagenet2012")):
        data_fixtures.make_fake_imagenet(os.path.join(work, "manual"), images_per_class=per_class,
                                         num_val=min(256, args.images), corrupt=False,
                                         small=False, min_side=333, max_side=500)
        tfds_utils.prepare_builder(tfds_utils.get_builder("imagenet2012", data_dir),
                                   manual_dir=os.path.join(work, "manual"))
    src = tfds_utils.data_source("imagenet2012", "train", data_dir)
    records = [src[i] for i in range(len(src))]
    sizes = np.array([cv2.imdecode(np.frombuffer(r["image"], np.uint8), 1).shape[:2]
                      for r in records[:64]])
    print(f"dataset: {len(records)} JPEGs, mean size {sizes.mean(0).round()} (HxW), "
          f"cv2 {cv2.__version__}, {os.cpu_count()} CPUs")

    cfg = config_lib.default_input_config()
    cfg.data_dir = data_dir
    cfg.num_threads = args.threads
    chains = {
        "decode only (full, cv2)": "decode|resize(224)",
        "eval: resize_crop|normalize": cfg.eval_ops,
        "train: rrc|flip|normalize": "rrc|flip|normalize",
        "train: rrc(max_upscale=2)|flip|normalize": "rrc(max_upscale=2)|flip|normalize",
        "train: rrc|flip|randaug|normalize|erase": cfg.train_ops,
    }
    print(f"load average: {os.getloadavg()[0]:.1f} (timings are inflated on a busy host)")
    print(f"\n{'ops':44s} {'cpu-ms/img':>10s} {'vs tf.data 1.1':>15s}")
    results = {}
    for name, chain in chains.items():
        pre = ops.Preprocessor(chain, cfg)
        _cpu_ms(pre, records[:16])  # warm-up
        ms = _cpu_ms(pre, records)
        results[name] = ms
        print(f"{name:44s} {ms:10.3f} {ms / TF_DATA_CPU_MS:14.2f}x")

    print(f"\nfull grain pipeline ({args.threads} threads, batch {args.batch_size}, "
          f"{args.batches} batches):")
    print(f"{'pipeline':44s} {'img/s':>8s} {'cpu-ms/img':>10s}")
    for name, chain in (("eval", None), ("train no RandAugment", "rrc|flip|normalize"),
                        ("train DeiT (RandAugment+erase)", cfg.train_ops)):
        c = config_lib.default_input_config()
        c.update(dict(cfg))
        if chain is None:
            it = iter(pipeline.create_eval_iter(c, global_batch_size=args.batch_size,
                                                process_index=0, process_count=1))
            n_batches = min(args.batches, len(records) // args.batch_size)
        else:
            c.train_ops = chain
            it = pipeline.create_train_iter(c, global_batch_size=args.batch_size, seed=0,
                                            process_index=0, process_count=1)
            n_batches = args.batches
        next(it)  # start-up
        t_wall, t_cpu = time.perf_counter(), time.process_time()
        n = 0
        for _ in range(n_batches - 1):
            b = next(it)
            n += b["image"].shape[0]
        wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
        print(f"{name:44s} {n / wall:8.0f} {cpu / max(n, 1) * 1e3:10.3f}")
    return results


if __name__ == "__main__":
    main()
