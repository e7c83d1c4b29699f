"""Input-pipeline benchmark: CPU-ms per image and images/s at 224 (eval and train ops).

Data: real photos bundled with scikit-image, cropped/resized to ImageNet-like sizes
(333-500 px sides, JPEG quality 90), prepared into a real TFDS ArrayRecord ``imagenet2012``
through our TF-free builder (fake ILSVRC2012 tars from ``tests/data_fixtures.py``).

Two measurements per op chain:

* ``cpu-ms/img``: single thread, ``time.process_time`` over all images, preprocessing only
  (record already read). When TensorFlow is importable (it is not a dependency: ``pip install
  tensorflow-cpu``), the same JPEGs also go through the standard tf.data chains
  (``decode_and_crop_jpeg`` + resize + flip [+ normalize]) single-threaded, and each of our train
  chains is printed as a ratio to its like-for-like tf.data chain from the same run. Without
  TensorFlow the ratio column uses the issue's figure (~1.1 CPU-ms/img, another host).
* ``img/s``: the full grain pipeline (``create_train_iter`` / ``create_eval_iter``: ArrayRecord
  read + preprocessing in ``num_threads`` threads + batching), wall clock, all cores, and its
  CPU cost per image (process CPU time / images).

Also, single-threaded: full-size simplejpeg decoding at ``fast=0/1/2`` (``transforms.decode``),
its CPU-ms/img and, per image, the PSNR and mean absolute difference of ``fast=1/2`` against
``fast=0``.

Each single-thread chain runs with each available decoder back-end -- OpenCV (the code before
simplejpeg), simplejpeg, simplejpeg + TurboJPEG region decoding -- ``--reps`` times each; the
median is shown.

Usage::

    python benchmarks/input_pipeline.py [--images 512] [--threads 4] [--batches 20] [--reps 3] [--json OUT]

``--json`` writes every repetition's CPU-ms/img per chain and back-end, the medians, the tf.data
timings (when TensorFlow ran), the ``fast`` decode timings and errors, the full-pipeline figures,
the dataset's size, and the machine, load, versions and command (benchmarks/run_info.py);
benchmarks/render_docs.py renders docs/data.md's figures from it.
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
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

TF_DATA_CPU_MS = 1.1  # tf.data decode_and_crop_jpeg, per the issue (same machine)


def _tf_data_cpu_ms(jpegs: list[bytes], resize: str | None, normalize: bool,
                    reps: int) -> list[float] | None:
    """tf.data's CPU-ms/img for the same JPEGs, single-threaded, or None without TensorFlow.

    ``resize=None``: full ``decode_jpeg`` + 224 centre crop (the yardstick). ``resize=""``: the
    crop sampling and ``decode_and_crop_jpeg`` alone (where tf.data's cost goes). Otherwise the
    standard TF ImageNet train chain: ``sample_distorted_bounding_box`` (area 0.08-1, aspect
    3/4-4/3) -> ``decode_and_crop_jpeg`` -> ``resize`` to 224 with ``resize`` ('bilinear' is
    TF's default, 'bicubic' is DeiT's) -> random flip -> [per-channel mean/std normalization].
    TensorFlow is not a dependency: install ``tensorflow-cpu`` beside the package to get these
    rows.
    """
    try:
        import tensorflow as tf
    except ImportError:
        return None
    try:
        tf.config.threading.set_inter_op_parallelism_threads(1)
        tf.config.threading.set_intra_op_parallelism_threads(1)
    except RuntimeError:  # already initialized by an earlier call
        pass
    mean = tf.constant([0.485, 0.456, 0.406]) * 255.0
    std = tf.constant([0.229, 0.224, 0.225]) * 255.0

    def train(data):
        shape = tf.image.extract_jpeg_shape(data)
        begin, size, _ = tf.image.sample_distorted_bounding_box(
            shape, tf.zeros([0, 0, 4]), min_object_covered=0.0, aspect_ratio_range=(3 / 4, 4 / 3),
            area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
        window = tf.stack([begin[0], begin[1], size[0], size[1]])
        img = tf.image.decode_and_crop_jpeg(data, window, channels=3)
        if not resize:  # decode_and_crop_jpeg alone; one pixel out, as crops differ in size
            return img[0, 0]
        img = tf.image.random_flip_left_right(tf.image.resize(img, (224, 224), method=resize))
        return (img - mean) / std if normalize else img

    def full(data):
        return tf.image.resize_with_crop_or_pad(tf.image.decode_jpeg(data, channels=3), 224, 224)

    opts = tf.data.Options()
    opts.threading.private_threadpool_size = 1
    opts.threading.max_intra_op_parallelism = 1
    ds = (tf.data.Dataset.from_tensor_slices(jpegs).map(full if resize is None else train)
          .batch(32).with_options(opts))
    for _ in ds.take(1):  # warm-up (tracing)
        pass
    times = []
    for _ in range(reps):
        t = time.process_time()
        for _ in ds:
            pass
        times.append((time.process_time() - t) / len(jpegs) * 1e3)
    return times


#: tf.data chains (name -> (resize, normalize)) and which of ours each is compared with
TF_CHAINS = {
    "tf.data: decode_jpeg + centre crop (yardstick)": (None, False),
    "tf.data: decode_and_crop": ("", False),
    "tf.data: decode_and_crop|bilinear|flip": ("bilinear", False),
    "tf.data: decode_and_crop|bicubic|flip": ("bicubic", False),
    "tf.data: decode_and_crop|bilinear|flip|normalize": ("bilinear", True),
}


def _tf_reference(name: str) -> str | None:
    """The tf.data row one of our single-thread chains is compared with in the same run."""
    if name.startswith("full decode only"):
        return "tf.data: decode_jpeg + centre crop (yardstick)"
    if not name.startswith("train: rrc") or "randaug" in name:
        return None
    if "on_device=1" in name:  # uint8 out, normalized on the accelerator
        return "tf.data: decode_and_crop|bilinear|flip"
    return "tf.data: decode_and_crop|bilinear|flip|normalize"


def _psnr(a: np.ndarray, b: np.ndarray) -> float | None:
    """PSNR in dB of ``a`` against ``b`` (uint8); None when they are identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return 10 * np.log10(255.0 ** 2 / mse) if mse else None


def _fast_decode(jpegs: list[bytes], reps: int) -> dict | None:
    """Full-size simplejpeg decoding at ``fast`` = 0, 1, 2 (see ``transforms.decode``): the
    single-thread CPU-ms/img of each level (every repetition; the levels interleaved), and for
    1 and 2, per image, the PSNR (dB) and the mean absolute difference (gray levels) against
    ``fast=0``. None without simplejpeg; JPEGs simplejpeg refuses are left out."""
    from halluvit_jax.data import transforms as T

    if T._sj is None:
        return None
    dec = lambda data, fast: T._decode_simplejpeg(data, 1, fast, None)
    jpegs = [j for j in jpegs if dec(j, 0) is not None]
    out = {"images": len(jpegs), "cpu_ms_per_image_reps": {}, "psnr_db": {}, "mean_abs_diff": {},
           "identical_images": {}}
    ref = [dec(j, 0) for j in jpegs]
    levels = (0, 1, 2)
    for j in jpegs[:16]:  # warm-up
        for fast in levels:
            dec(j, fast)
    # The levels are interleaved image by image, in a rotating order, so that a change in the
    # host's load between them (other jobs) falls on all three alike.
    for _ in range(reps):
        total = dict.fromkeys(levels, 0.0)
        for i, j in enumerate(jpegs):
            for fast in levels[i % 3:] + levels[:i % 3]:
                t = time.process_time()
                dec(j, fast)
                total[fast] += time.process_time() - t
        for fast in levels:
            out["cpu_ms_per_image_reps"].setdefault(str(fast), []).append(total[fast] / len(jpegs) * 1e3)
    for fast in levels[1:]:
        imgs = [dec(j, fast) for j in jpegs]
        psnr = [_psnr(a, b) for a, b in zip(imgs, ref)]
        out["psnr_db"][str(fast)] = [round(p, 3) for p in psnr if p is not None]
        out["identical_images"][str(fast)] = psnr.count(None)
        out["mean_abs_diff"][str(fast)] = [
            round(float(np.mean(np.abs(a.astype(np.int16) - b.astype(np.int16)))), 4)
            for a, b in zip(imgs, ref)]
    return out


def _cpu_ms(pre, records, reps: int = 1) -> float:
    t = time.process_time()
    for _ in range(reps):
        for i, r in enumerate(records):
            pre.apply(r["image"], np.random.default_rng(i))
    return (time.process_time() - t) / (reps * len(records)) * 1e3


#: op chains timed single-threaded (name -> ops); the DeiT chain is added from the config
CHAINS = {
    "full decode only (yardstick)": "decode|center_crop(224)",
    "full decode + resize": "decode|resize(224)",
    "eval: resize_crop|normalize": "resize_crop|normalize",
    "train: rrc|flip|normalize": "rrc|flip|normalize",
    "train: rrc(fast=0)|flip|normalize": "rrc(fast=0)|flip|normalize",
    "train: rrc|flip|normalize(on_device=1)": "rrc|flip|normalize(on_device=1)",
    "train: rrc(max_upscale=2)|flip|normalize(on_device=1)":
        "rrc(max_upscale=2)|flip|normalize(on_device=1)",
    "train: rrc|flip|randaug|normalize(on_device=1)": "rrc|flip|randaug|normalize(on_device=1)",
}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=512, help="train images in the fake dataset")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--batches", type=int, default=16)
    ap.add_argument("--batch_size", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3, help="repetitions of each single-thread timing")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", default="", help="also write the raw results, machine and versions here")
    args = ap.parse_args(argv)
    import run_info

    head = run_info.header("input_pipeline", __file__, argv,
                           extra=("grain", "opencv-python-headless", "simplejpeg", "turbojpeg", "tensorflow",
                                  "tensorflow-cpu"))
    raw: dict[str, dict[str, list[float]]] = {}
    tf_raw: dict[str, list[float]] = {}
    full: dict[str, dict[str, float]] = {}

    import cv2
    import data_fixtures

    from halluvit_jax.data import config as config_lib
    from halluvit_jax.data import ops, pipeline, registry, tfds_utils
    from halluvit_jax.data import transforms as T

    work = args.workdir or tempfile.mkdtemp(prefix="halluvit_bench_")
    per_class = max(1, args.images // len(data_fixtures.SYNSETS))
    data_dir = os.path.join(work, "data")
    if not os.path.exists(os.path.join(data_dir, "imagenet2012")):
        data_fixtures.make_fake_imagenet(os.path.join(work, "manual"), images_per_class=per_class,
                                         num_val=min(256, args.images), corrupt=False,
                                         small=False, min_side=333, max_side=500)
        tfds_utils.prepare_builder(registry.get_builder("imagenet2012", data_dir),
                                   manual_dir=os.path.join(work, "manual"))
    src = registry.data_source("imagenet2012", "train", data_dir)
    n_val = len(registry.data_source("imagenet2012", "validation", data_dir))
    records = [src[i] for i in range(len(src))]
    sizes = np.array([cv2.imdecode(np.frombuffer(r["image"], np.uint8), 1).shape[:2]
                      for r in records])
    sj, tj = T._sj, T._turbojpeg()
    print(f"dataset: {len(records)} JPEGs, mean size {sizes.mean(0).round()} (HxW), "
          f"cv2 {cv2.__version__}, simplejpeg {getattr(sj, '__version__', 'not installed')}, "
          f"region decoding: {T.roi_decoder()}, {os.cpu_count()} CPUs")

    cfg = config_lib.default_input_config()
    cfg.data_dir = data_dir
    cfg.num_threads = args.threads
    chains = {**CHAINS, "train DeiT: rrc|flip|randaug|normalize|erase": cfg.train_ops}
    # decoder back-ends: (simplejpeg module, TurboJPEG library) patched into transforms
    backends = {"cv2": (None, None)}
    if sj is not None:
        backends["sj"] = (sj, None)
    if tj is not None:
        backends["sj+roi"] = (sj, tj)
    print(f"load average: {os.getloadavg()[0]:.1f} (timings are inflated on a busy host)")
    print(f"\nsingle thread, process CPU-ms/img, median of {args.reps} (runs of the last "
          "column in brackets).\ncv2 = OpenCV decoder (the code before simplejpeg), sj = "
          "simplejpeg, sj+roi = simplejpeg + TurboJPEG region decoding")
    print(f"{'ops':54s} " + " ".join(f"{b:>7s}" for b in backends) + f"  vs {TF_DATA_CPU_MS} ms (issue)")
    results = {}
    for name, chain in chains.items():
        row = {}
        for backend, (mod, lib) in backends.items():
            T._sj, T._TJ_STATE["lib"] = mod, lib
            try:
                pre = ops.Preprocessor(chain, cfg)
                _cpu_ms(pre, records[:16])  # warm-up
                row[backend] = [_cpu_ms(pre, records) for _ in range(args.reps)]
            finally:
                T._sj, T._TJ_STATE["lib"] = sj, tj
        results[name] = {k: float(np.median(v)) for k, v in row.items()}
        raw[name] = row
        last = list(row.values())[-1]
        print(f"{name:54s} " + " ".join(f"{results[name][b]:7.3f}" for b in backends)
              + f"  {np.median(last) / TF_DATA_CPU_MS:5.2f}x  "
              f"[{', '.join(f'{v:.3f}' for v in last)}]")

    jpegs = [r["image"] for r in records]
    fast_decode = _fast_decode(jpegs, args.reps)
    if fast_decode is not None:
        print(f"\nfull-size simplejpeg decode of {fast_decode['images']} JPEGs, single thread "
              f"(median of {args.reps}), against fast=0:")
        for fast, times in fast_decode["cpu_ms_per_image_reps"].items():
            line = f"  fast={fast}: {np.median(times):.3f} CPU-ms/img"
            if fast != "0":
                psnr, mad = fast_decode["psnr_db"][fast], fast_decode["mean_abs_diff"][fast]
                line += (f", PSNR {min(psnr, default=0):.1f}-{max(psnr, default=0):.1f} dB, mean "
                         f"|diff| {min(mad):.2f}-{max(mad):.2f} gray levels")
            print(line)
    tf_results = {}
    for name, (resize, normalize) in TF_CHAINS.items():
        times = _tf_data_cpu_ms(jpegs, resize, normalize, args.reps)
        if times is None:
            print("tf.data: TensorFlow is not installed; the ratios above use the issue's figure "
                  f"({TF_DATA_CPU_MS} ms). `pip install tensorflow-cpu` to time tf.data here.")
            break
        tf_results[name] = float(np.median(times))
        tf_raw[name] = list(times)
        print(f"{name:54s} {tf_results[name]:7.3f}  [{', '.join(f'{v:.3f}' for v in times)}]")
    if tf_results:
        print("\nsame-run ratios, ours (best back-end) / tf.data; < 1 means less CPU than tf.data:")
        for name in chains:
            ref = _tf_reference(name)
            if ref is not None:
                ratio = min(results[name].values()) / tf_results[ref]
                print(f"  {name:54s} {ratio:5.2f}x  vs {ref[len('tf.data: '):]}")
        results["tf.data"] = tf_results

    print(f"\nfull grain pipeline ({args.threads} threads, batch {args.batch_size}, "
          f"{args.batches} batches):")
    print(f"{'pipeline':44s} {'img/s':>8s} {'cpu-ms/img':>10s}")
    for name, chain in (("eval", None), ("train no RandAugment", "rrc|flip|normalize"),
                        ("train no RandAugment, uint8 out",
                         "rrc|flip|normalize(on_device=1)"),
                        ("train DeiT (RandAugment+erase)", cfg.train_ops)):
        c = config_lib.default_input_config()
        c.update(dict(cfg))
        if chain is None:
            it = iter(pipeline.create_eval_iter(c, global_batch_size=args.batch_size,
                                                process_index=0, process_count=1))
            n_batches = min(args.batches, -(-n_val // args.batch_size))
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
        if chain is None:
            n -= int((~b["mask"]).sum())  # padding of the last eval batch
        wall, cpu = time.perf_counter() - t_wall, time.process_time() - t_cpu
        print(f"{name:44s} {n / wall:8.0f} {cpu / max(n, 1) * 1e3:10.3f}")
        full[name] = {"images_per_s": n / wall, "cpu_ms_per_image": cpu / max(n, 1) * 1e3}
    if args.json:
        run_info.write_json(args.json, {
            **head, "settings": vars(args), "cpu_ms_per_image_median": results,
            "cpu_ms_per_image_reps": raw, "tf_data_cpu_ms_per_image_reps": tf_raw,
            "tf_data_reference": {name: _tf_reference(name) for name in chains if _tf_reference(name)},
            "full_pipeline": full, "fast_decode": fast_decode,
            "dataset": {"train_jpegs": len(records), "validation_jpegs": n_val,
                        "mean_height_width": [round(float(v), 1) for v in sizes.mean(0)]},
            "backends": list(backends), "load_average_end": run_info.loadavg()})
    return results


if __name__ == "__main__":
    main()
