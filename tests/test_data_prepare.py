"""TF-free preparation: fake ILSVRC2012 tars (real JPEG photos) -> TFDS ArrayRecord, demo, errors."""

from __future__ import annotations

import io
import json
import os
import sys
import tarfile

import data_fixtures as dfx
import numpy as np
import pytest

from halluvit_jax.data import config as config_lib
from halluvit_jax.data import demo, pipeline, prepare, registry, tfds_utils
from halluvit_jax.data.tfds_utils import DatasetNotPreparedError, ManualDirError


@pytest.fixture(scope="module")
def imagenet(tmp_path_factory):
    return dfx.prepared_fake_imagenet(tmp_path_factory)


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    return dfx.prepared_demo(tmp_path_factory)


def _decode(data: bytes) -> np.ndarray:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    assert im.format == "JPEG" and im.mode in ("RGB", "L"), (im.format, im.mode)
    return np.asarray(im.convert("RGB"))


def _records(split, data_dir, name="imagenet2012"):
    src = registry.data_source(name, split, data_dir)
    return {r["file_name"].decode(): r for r in (src[i] for i in range(len(src)))}


def test_prepare_writes_all_valid_images_with_correct_labels(imagenet):
    fake, data_dir, summary = imagenet
    synsets = dfx.imagenet_synsets()  # TFDS's shipped labels.txt: label id = row
    train = _records("train", data_dir)
    assert set(train) == set(fake.train)  # corrupt image excluded, nothing else lost
    for fname, rec in train.items():
        assert int(rec["label"]) == synsets.index(fake.train[fname])
    val = _records("validation", data_dir)
    assert set(val) == set(fake.validation)
    for fname, rec in val.items():
        assert int(rec["label"]) == synsets.index(fake.validation[fname])
    assert summary["splits"] == {"train": len(fake.train), "validation": len(fake.validation)}
    # The data is ArrayRecord in TFDS's layout: readable by stock TFDS (no TF either).
    import tensorflow_datasets as tfds

    stock = tfds.data_source("imagenet2012", split="validation", data_dir=data_dir,
                             decoders={"image": tfds.decode.SkipDecoding()})
    assert len(stock) == len(fake.validation)
    assert any(f.endswith(".array_record-00000-of-00001")
               for f in os.listdir(os.path.join(data_dir, "imagenet2012", "5.1.0")))
    assert "tensorflow" not in sys.modules


def test_stored_pixels_match_source_photos(imagenet):
    fake, data_dir, _ = imagenet
    train = _records("train", data_dir)
    for fname in list(fake.train)[:6] + [dfx.GRAY_NAME, dfx.SMALL_NAME]:
        img = _decode(train[fname]["image"])
        assert img.shape == fake.pixels[fname].shape
        assert np.abs(img.astype(int) - fake.pixels[fname]).mean() < 6.0  # JPEG q90 error (40x30 image: ~4)


def test_cmyk_and_png_are_reencoded_as_rgb_jpeg(imagenet):
    fake, data_dir, summary = imagenet
    train = _records("train", data_dir)
    for fname in (dfx.CMYK_NAME, dfx.PNG_NAME):
        data = train[fname]["image"]
        assert data[:2] == b"\xff\xd8"  # JPEG now (was CMYK JPEG / PNG)
        img = _decode(data)
        from PIL import Image

        assert Image.open(io.BytesIO(data)).mode == "RGB"
        assert np.abs(img.astype(int) - fake.pixels[fname]).mean() < 6.0
    assert summary["reencoded"] == {"cmyk": 1, "png": 1}


def test_corrupt_jpeg_is_skipped_with_counted_warning(imagenet):
    fake, data_dir, summary = imagenet
    assert summary["skipped"] == fake.corrupt == [dfx.CORRUPT_NAME]
    warnings = [r.getMessage() for r in summary["log"] if r.levelname == "WARNING"]
    assert any(dfx.CORRUPT_NAME in m and "1 skipped" in m for m in warnings), warnings
    assert dfx.CORRUPT_NAME not in _records("train", data_dir)


def test_prepare_is_idempotent(imagenet):
    fake, data_dir, _ = imagenet
    vdir = os.path.join(data_dir, "imagenet2012", "5.1.0")
    before = {f: os.stat(os.path.join(vdir, f)).st_mtime_ns for f in os.listdir(vdir)}
    summary = prepare.prepare_dataset("imagenet2012", data_dir, fake.manual_dir)
    assert summary["prepared"] is False
    assert {f: os.stat(os.path.join(vdir, f)).st_mtime_ns for f in os.listdir(vdir)} == before


def test_validation_labels_follow_file_number_for_any_subset(tmp_path):
    """Val files 3 and 5 only (not a prefix): labels must be rows 3 and 5 of the label file."""
    labels = dfx.imagenet_validation_labels()
    synsets = dfx.imagenet_synsets()
    rng = np.random.default_rng(1)
    manual = tmp_path / "manual"
    manual.mkdir()
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as t:
        for i in (5, 3):
            dfx._add(t, f"ILSVRC2012_val_{i:08d}.JPEG", dfx.encode(dfx.random_photo(rng)))
    prepare.prepare_dataset("imagenet2012", tmp_path / "data", manual)
    val = _records("validation", tmp_path / "data")
    assert {k: int(v["label"]) for k, v in val.items()} == {
        "ILSVRC2012_val_00000003.JPEG": synsets.index(labels[2]),
        "ILSVRC2012_val_00000005.JPEG": synsets.index(labels[4]),
    }
    # Train split absent -> reading it gives the one-line "not prepared" error.
    cfg = config_lib.default_input_config()
    cfg.data_dir = str(tmp_path / "data")
    with pytest.raises(DatasetNotPreparedError, match="Split 'train'"):
        pipeline.num_examples(cfg, "train")


def test_interrupted_prepare_never_looks_complete_and_resumes(tmp_path):
    fake = dfx.make_fake_imagenet(tmp_path / "manual", images_per_class=1, num_val=2,
                                  corrupt=False, small=False)
    good = (tmp_path / "manual" / "ILSVRC2012_img_train.tar").read_bytes()
    # Append a bogus member after the real synsets: generation fails midway through train.
    with tarfile.open(tmp_path / "manual" / "ILSVRC2012_img_train.tar", "a") as t:
        dfx._add(t, "n99999999.tar", b"junk")
    data_dir = tmp_path / "data"
    with pytest.raises(ManualDirError, match="n99999999.tar"):
        prepare.prepare_dataset("imagenet2012", data_dir, fake.manual_dir)
    cfg = config_lib.default_input_config()
    cfg.data_dir = str(data_dir)
    with pytest.raises(DatasetNotPreparedError):
        pipeline.num_examples(cfg, "train")
    (tmp_path / "manual" / "ILSVRC2012_img_train.tar").write_bytes(good)
    summary = prepare.prepare_dataset("imagenet2012", data_dir, fake.manual_dir)
    assert summary["prepared"] and summary["splits"]["train"] == len(fake.train)
    assert not [d for d in os.listdir(data_dir / "imagenet2012") if d.startswith("incomplete")]


def test_missing_or_malformed_manual_dir_errors(tmp_path):
    with pytest.raises(ManualDirError, match="does not exist"):
        prepare.prepare_dataset("imagenet2012", tmp_path / "d", tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ManualDirError, match="No ImageNet tar found"):
        prepare.prepare_dataset("imagenet2012", tmp_path / "d", tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "ILSVRC2012_img_train.tar").write_bytes(b"this is not a tar file" * 100)
    with pytest.raises(ManualDirError, match="not a readable tar|does not look like"):
        prepare.prepare_dataset("imagenet2012", tmp_path / "d", bad)
    wrong = tmp_path / "wrong"
    wrong.mkdir()
    with tarfile.open(wrong / "ILSVRC2012_img_val.tar", "w") as t:
        dfx._add(t, "cat.jpg", b"x")
    with pytest.raises(ManualDirError, match="does not look like ILSVRC2012_img_val.tar"):
        prepare.prepare_dataset("imagenet2012", tmp_path / "d", wrong)
    # CLI: clear message, exit code 2.
    assert prepare.main(["imagenet2012", "--data_dir", str(tmp_path / "d"),
                         "--manual_dir", str(tmp_path / "nope")]) == 2


def test_unprepared_data_dir_gives_one_line_error_naming_command(tmp_path):
    cfg = config_lib.default_input_config()
    cfg.data_dir = str(tmp_path)
    with pytest.raises(DatasetNotPreparedError) as e:
        pipeline.create_train_iter(cfg, global_batch_size=2, seed=0, process_index=0,
                                   process_count=1)
    msg = str(e.value)
    assert "\n" not in msg
    assert "python -m halluvit_jax.data.prepare imagenet2012 --manual_dir" in msg
    cfg.dataset = demo.DEMO_DATASET
    with pytest.raises(DatasetNotPreparedError, match="prepare demo --data_dir"):
        pipeline.num_classes(cfg)


def test_demo_dataset_is_the_sklearn_digits(demo_dir):
    from sklearn.datasets import load_digits

    digits = load_digits()
    seen = []
    for split, n in (("train", demo.DEMO_NUM_TRAIN), ("validation", demo.DEMO_NUM_VALIDATION)):
        recs = _records(split, demo_dir, demo.DEMO_DATASET)
        assert len(recs) == n
        for fname, r in recs.items():
            i = int(fname.split("_")[1].split(".")[0])
            seen.append(i)
            assert int(r["label"]) == digits.target[i]
            img = _png(r["image"])
            assert img.shape == (32, 32, 3)
            # Downscaling back to 8x8 recovers the original 16-level scan.
            import cv2

            small = cv2.resize(img[..., 0].astype(np.float32), (8, 8), interpolation=cv2.INTER_AREA)
            assert np.abs(small * 16 / 255 - digits.images[i]).mean() < 1.0
    assert sorted(seen) == list(range(1797))  # disjoint splits covering all digits
    # Idempotent and fast.
    assert tfds_utils.prepare_builder(demo.HalluvitDigits(data_dir=demo_dir)) is False


def _png(data: bytes) -> np.ndarray:
    from PIL import Image

    im = Image.open(io.BytesIO(data))
    assert im.format == "PNG"
    return np.asarray(im)


def test_cli_prepares_demo(tmp_path, capsys):
    assert prepare.main(["demo", "--data_dir", str(tmp_path)]) == 0
    assert "splits {'train': 1500, 'validation': 297}" in capsys.readouterr().out
    assert prepare.main(["demo", "--data_dir", str(tmp_path)]) == 0
    assert "already prepared" in capsys.readouterr().out


def test_imagenet_real_and_v2_from_manual_files(imagenet, tmp_path):
    fake, _, _ = imagenet
    manual = tmp_path / "manual"
    manual.mkdir()
    os.link(os.path.join(fake.manual_dir, "ILSVRC2012_img_val.tar"),
            manual / "ILSVRC2012_img_val.tar")
    real = [[i % 1000, (i * 7) % 1000] if i % 3 else [] for i in range(len(fake.validation))]
    (manual / "real.json").write_text(json.dumps(real))
    rng = np.random.default_rng(2)
    with tarfile.open(manual / "imagenetv2-matched-frequency.tar.gz", "w:gz") as t:
        for c in (0, 417, 999):
            dfx._add(t, f"imagenetv2-matched-frequency-format-val/{c}/a{c}.jpeg",
                     dfx.encode(dfx.random_photo(rng)))
    prepare.prepare_dataset("imagenet2012_real", tmp_path / "data", manual)
    recs = _records("validation", tmp_path / "data", "imagenet2012_real")
    assert len(recs) == len(fake.validation)
    for fname, r in recs.items():
        i = int(fname[-13:-5])
        assert [int(x) for x in r["real_label"]] == real[i - 1]
    prepare.prepare_dataset("imagenet_v2/matched-frequency", tmp_path / "data", manual)
    v2 = _records("test", tmp_path / "data", "imagenet_v2/matched-frequency")
    assert {k: int(r["label"]) for k, r in v2.items()} == {"0/a0.jpeg": 0, "417/a417.jpeg": 417,
                                                            "999/a999.jpeg": 999}
    with pytest.raises(ManualDirError, match="real.json"):
        prepare.prepare_dataset("imagenet2012_real", tmp_path / "data3", fake.manual_dir)


def test_regular_jpegs_are_stored_byte_identical(imagenet):
    """Like the stock TFDS builder, valid RGB/gray JPEGs are passed through untouched."""
    fake, data_dir, _ = imagenet
    originals = {}
    with tarfile.open(os.path.join(fake.manual_dir, "ILSVRC2012_img_train.tar")) as outer:
        for m in outer.getmembers():
            with tarfile.open(fileobj=outer.extractfile(m)) as inner:
                for im in inner.getmembers():
                    originals[im.name] = inner.extractfile(im).read()
    train = _records("train", data_dir)
    for fname, rec in train.items():
        if fname in (dfx.CMYK_NAME, dfx.PNG_NAME):
            assert rec["image"] != originals[fname]
        else:
            assert rec["image"] == originals[fname], fname
