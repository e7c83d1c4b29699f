"""TF-free CIFAR-100 and Stanford Dogs: real-format archives built here -> TFDS ArrayRecord ->
the input pipeline; bad archives give one-line errors, corrupt JPEGs are skipped and counted."""

from __future__ import annotations

import gzip
import io
import pickle
import sys
import tarfile

import numpy as np
import pytest

from halluvit_jax.data import config as config_lib
from halluvit_jax.data import pipeline, prepare, registry
from halluvit_jax.data.tfds_utils import DatasetNotPreparedError, ManualDirError


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _read_config(name, data_dir, size):
    cfg = config_lib.default_input_config()
    cfg.dataset, cfg.data_dir, cfg.image_size, cfg.crop_pct = name, str(data_dir), size, 1.0
    cfg.mean, cfg.std = (0.0, 0.0, 0.0), (1.0, 1.0, 1.0)  # normalize -> pixels / 255
    cfg.train_ops, cfg.eval_ops = "rrc(scale=0.5-1)|flip|normalize", "resize_crop|normalize"
    cfg.num_threads, cfg.prefetch_buffer_size = 2, 8
    return cfg


def _eval_all(cfg, batch):
    images, labels = [], []
    for b in pipeline.create_eval_iter(cfg, global_batch_size=batch, process_index=0,
                                       process_count=1):
        m = np.asarray(b["mask"])
        images.append(np.asarray(b["image"])[m])
        labels.append(np.asarray(b["label"])[m])
    return np.concatenate(images), np.concatenate(labels)


# --------------------------------------------------------------------------------------------
# CIFAR-100 (python version: cifar-100-python.tar.gz with pickled dicts train / test / meta).
# --------------------------------------------------------------------------------------------

N_TRAIN, N_TEST = 40, 24


def _cifar_split(rng, n):
    images = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    fine = rng.integers(0, 100, n)
    # Python 2 cPickle layout as shipped: bytes keys, data = R, G, B planes of 32x32 per row.
    d = {b"data": images.transpose(0, 3, 1, 2).reshape(n, 3072), b"fine_labels": fine.tolist(),
         b"coarse_labels": (fine // 5).tolist(), b"batch_label": b"training batch 1 of 1",
         b"filenames": [f"img_{i}.png".encode() for i in range(n)]}
    return d, images, fine


def make_cifar_archive(path, members=None, seed=0):
    rng = np.random.default_rng(seed)
    train, train_images, train_fine = _cifar_split(rng, N_TRAIN)
    test, test_images, test_fine = _cifar_split(rng, N_TEST)
    meta = {b"fine_label_names": [f"fine_{i}".encode() for i in range(100)],
            b"coarse_label_names": [f"coarse_{i}".encode() for i in range(20)]}
    members = members or {"train": pickle.dumps(train, protocol=2),
                          "test": pickle.dumps(test, protocol=2),
                          "meta": pickle.dumps(meta, protocol=2)}
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            _add(tar, f"cifar-100-python/{name}", data)
    return {"train": (train_images, train_fine), "test": (test_images, test_fine)}


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    root = tmp_path_factory.mktemp("cifar")
    (root / "manual").mkdir()
    truth = make_cifar_archive(root / "manual" / "cifar-100-python.tar.gz")
    assert prepare.main(["cifar100", "--manual_dir", str(root / "manual"),
                         "--data_dir", str(root / "data")]) == 0
    return root, truth


def test_cifar100_prepared_like_the_catalog_and_read_by_the_pipeline(cifar):
    root, truth = cifar
    builder = registry.get_builder("cifar100", root / "data")
    assert (builder.name, str(builder.version)) == ("cifar100", "3.0.2")
    assert set(builder.info.features) == {"id", "image", "label", "coarse_label"}
    assert builder.info.features["label"].num_classes == 100
    assert builder.info.features["label"].names[7] == "fine_7"
    assert {s: int(v.num_examples) for s, v in builder.info.splits.items()} == {
        "train": N_TRAIN, "test": N_TEST}
    # Records are stored in TFDS's key-hash order (as the stock builder's); ids give file order.
    src = registry.data_source("cifar100", "test", root / "data")
    order = [int(src[i]["id"].decode().removeprefix("test_")) for i in range(len(src))]
    assert sorted(order) == list(range(N_TEST))
    assert [int(src[i]["coarse_label"]) for i in range(len(src))] == [
        truth["test"][1][j] // 5 for j in order]
    # Eval pipeline: lossless PNG -> the exact pixels and labels.
    cfg = _read_config("cifar100", root / "data", 32)
    cfg.eval_split = "test"
    images, labels = _eval_all(cfg, 16)
    np.testing.assert_array_equal(labels, truth["test"][1][order])
    np.testing.assert_allclose(images * 255.0, truth["test"][0][order], atol=1e-3)
    assert pipeline.num_classes(cfg) == 100 and pipeline.num_examples(cfg, "train") == N_TRAIN
    # Train pipeline at the paper's transfer resolution (upscaled crops).
    it = pipeline.create_train_iter(_read_config("cifar100", root / "data", 64),
                                    global_batch_size=8, seed=0, process_index=0, process_count=1)
    b = next(it)
    assert b["image"].shape == (8, 64, 64, 3) and b["image"].dtype == np.float32
    assert set(np.asarray(b["label"]).tolist()) <= set(truth["train"][1].tolist())
    # Re-running is a no-op; TensorFlow was never needed.
    assert prepare.prepare_dataset("cifar100", root / "data", root / "manual")["prepared"] is False
    assert "tensorflow" not in sys.modules


def _bad_manual_dir(name: str, tmp_path, *needles: str):
    """``run(manual) -> message`` of the one-line ManualDirError that preparing ``name`` from
    ``manual`` raises (each line names ``needles``: the archive, where to get it); checks a
    missing and an empty manual dir first."""

    def run(manual) -> str:
        with pytest.raises(ManualDirError) as e:
            prepare.prepare_dataset(name, tmp_path / "data", manual)
        msg = str(e.value)
        assert "\n" not in msg and all(n in msg for n in needles), msg
        return msg

    assert "does not exist" in run(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    assert "not found" in run(tmp_path / "empty")
    return run


def _cifar_manual(tmp_path, name: str, **members: bytes):
    """A manual dir ``tmp_path/name`` holding a CIFAR-100 archive of these member files."""
    manual = tmp_path / name
    manual.mkdir()
    make_cifar_archive(manual / "cifar-100-python.tar.gz", members=members)
    return manual


def test_cifar100_bad_archives_give_one_line_errors(tmp_path, capsys):
    run = _bad_manual_dir("cifar100", tmp_path, "cifar-100-python.tar.gz", "toronto.edu")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "cifar-100-python.tar.gz").write_bytes(b"not a tar" * 50)
    assert "not a readable" in run(bad)
    # Truncated download.
    trunc = tmp_path / "trunc"
    trunc.mkdir()
    make_cifar_archive(tmp_path / "full.tar.gz")
    data = (tmp_path / "full.tar.gz").read_bytes()
    (trunc / "cifar-100-python.tar.gz").write_bytes(data[: len(data) // 2])
    assert "not a readable" in run(trunc)
    # The binary version's members, or a missing member.
    nometa = _cifar_manual(tmp_path, "nometa", train=b"x", test=b"y")
    assert "lacks" in run(nometa) and "meta" in run(nometa)
    # A pickle that would run code is refused, not executed.
    class Boom:
        def __reduce__(self):
            return (print, ("pwned",))

    evil = _cifar_manual(tmp_path, "evil", train=pickle.dumps(Boom()), test=b"", meta=b"")
    assert "not a CIFAR-100 pickle" in run(evil)
    assert "pwned" not in capsys.readouterr().out
    # Inconsistent arrays (labels out of range).
    rng = np.random.default_rng(0)
    d, _, _ = _cifar_split(rng, 4)
    d[b"fine_labels"] = [0, 1, 2, 100]
    meta = {b"fine_label_names": [b"a"] * 100, b"coarse_label_names": [b"b"] * 20}
    dup = _cifar_manual(tmp_path, "dup", train=pickle.dumps(d), test=pickle.dumps(d), meta=pickle.dumps(meta))
    assert "fine_label_names has 1 distinct names in 100, expected 100" in run(dup)
    meta = {b"fine_label_names": [b"a%d" % i for i in range(100)],
            b"coarse_label_names": [b"b%d" % i for i in range(20)]}
    badlab = _cifar_manual(tmp_path, "badlab", train=pickle.dumps(d), test=pickle.dumps(d), meta=pickle.dumps(meta))
    assert "labels outside [0, 100)" in run(badlab)
    # CLI: one error line, exit code 2; nothing that looks prepared is left.
    capsys.readouterr()
    assert prepare.main(["cifar100", "--data_dir", str(tmp_path / "data"),
                         "--manual_dir", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "cifar-100-python.tar.gz" in err[0]
    with pytest.raises(DatasetNotPreparedError, match="prepare cifar100 --manual_dir"):
        registry.data_source("cifar100", "train", tmp_path / "data")


def test_cifar_archive_is_gzip(tmp_path):
    make_cifar_archive(tmp_path / "a.tar.gz")
    with gzip.open(tmp_path / "a.tar.gz") as f:
        assert f.read(1)


# --------------------------------------------------------------------------------------------
# Stanford Dogs (images.tar + lists.tar with MATLAB v5 lists, optional annotation.tar).
# --------------------------------------------------------------------------------------------

BREEDS = [f"n02{85620 + i:06d}-Breed_{i}" for i in range(120)]


def _jpeg(rng, h, w):
    import cv2

    img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = cv2.GaussianBlur(img, (5, 5), 0)
    ok, buf = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, 95])
    assert ok
    return buf.tobytes()


def _mat(files, labels) -> bytes:
    from scipy import io as sio

    buf = io.BytesIO()
    cell = np.empty((len(files), 1), dtype=object)
    for i, f in enumerate(files):
        cell[i, 0] = np.array([f])
    sio.savemat(buf, {"file_list": cell, "annotation_list": cell,
                      "labels": np.asarray(labels, np.float64)[:, None]}, format="5")
    return buf.getvalue()


def make_dogs(manual, corrupt=True, missing=True, annotation=True):
    """One train image per breed, one test image for the first 30; returns the truth."""
    rng = np.random.default_rng(0)
    manual.mkdir(parents=True, exist_ok=True)
    train = [f"{b}/{b.split('-')[0]}_{100 + i}.jpg" for i, b in enumerate(BREEDS)]
    test = [f"{b}/{b.split('-')[0]}_{900 + i}.jpg" for i, b in enumerate(BREEDS[:30])]
    names = sorted(b.lower() for b in BREEDS)
    truth = {"train": {}, "test": {}, "corrupt": None, "missing": None}
    with tarfile.open(manual / "images.tar", "w") as tar:
        for split, files in (("train", train), ("test", test)):
            for i, f in enumerate(files):
                if missing and split == "test" and i == 5:
                    truth["missing"] = f
                    continue
                data = _jpeg(rng, 40 + i % 7, 48 - i % 5)
                if corrupt and split == "train" and i == 3:
                    data = data[: len(data) // 3]
                    truth["corrupt"] = f"Images/{f}"
                else:
                    truth[split][f"Images/{f}"] = names.index(f.split("/")[0].lower())
                _add(tar, f"Images/{f}", data)
        _add(tar, "Images/README.txt", b"not listed")  # ignored like the stock builder
    with tarfile.open(manual / "lists.tar", "w") as tar:
        _add(tar, "train_list.mat", _mat(train, [BREEDS.index(f.split("/")[0]) + 1 for f in train]))
        _add(tar, "test_list.mat", _mat(test, [BREEDS.index(f.split("/")[0]) + 1 for f in test]))
        _add(tar, "file_list.mat", _mat(train + test, [1] * (len(train) + len(test))))
    if annotation:
        with tarfile.open(manual / "annotation.tar", "w") as tar:
            f = test[0]
            xml = ("<annotation><size><width>48</width><height>40</height></size><object>"
                   "<bndbox><xmin>12</xmin><ymin>4</ymin><xmax>36</xmax><ymax>30</ymax></bndbox>"
                   "</object></annotation>")
            _add(tar, f"Annotation/{f[:-4]}", xml.encode())
    return truth


@pytest.fixture(scope="module")
def dogs(tmp_path_factory):
    root = tmp_path_factory.mktemp("dogs")
    truth = make_dogs(root / "manual")
    summary = prepare.prepare_dataset("stanford_dogs", root / "data", root / "manual")
    return root, truth, summary


def test_stanford_dogs_prepared_like_the_catalog_and_read_by_the_pipeline(dogs):
    root, truth, summary = dogs
    assert summary["skipped"] == [truth["corrupt"]]  # skipped and counted, not written
    assert summary["missing"] == [truth["missing"]]
    assert summary["splits"] == {"train": 119, "test": 29}
    builder = registry.get_builder("stanford_dogs", root / "data")
    assert (builder.name, str(builder.version)) == ("stanford_dogs", "0.2.0")
    assert set(builder.info.features) == {"image", "image/filename", "label", "objects"}
    assert builder.info.features["label"].names == sorted(b.lower() for b in BREEDS)
    for split in ("train", "test"):
        src = registry.data_source("stanford_dogs", split, root / "data")
        got = {src[i]["image/filename"].decode(): int(src[i]["label"]) for i in range(len(src))}
        assert got == truth[split]
    src = registry.data_source("stanford_dogs", "test", root / "data")
    boxes = {src[i]["image/filename"].decode(): np.asarray(src[i]["objects"]["bbox"])
             for i in range(len(src))}
    first = f"Images/{BREEDS[0]}/{BREEDS[0].split('-')[0]}_900.jpg"
    np.testing.assert_allclose(boxes[first], [[4 / 40, 12 / 48, 30 / 40, 36 / 48]], rtol=1e-6)
    assert all(len(b) == 0 for k, b in boxes.items() if k != first)
    # Through the input pipeline at a small resolution.
    cfg = _read_config("stanford_dogs", root / "data", 24)
    cfg.eval_split = "test"
    images, labels = _eval_all(cfg, 8)
    assert images.shape == (29, 24, 24, 3) and sorted(labels.tolist()) == sorted(truth["test"].values())
    b = next(pipeline.create_train_iter(cfg, global_batch_size=4, seed=1, process_index=0,
                                        process_count=1))
    assert b["image"].shape == (4, 24, 24, 3)
    assert pipeline.num_classes(cfg) == 120
    assert "tensorflow" not in sys.modules


def test_stanford_dogs_bad_archives_give_one_line_errors(tmp_path, capsys):
    run = _bad_manual_dir("stanford_dogs", tmp_path, "vision.stanford.edu")
    assert "images.tar not found" in run(tmp_path / "empty")
    good = tmp_path / "good"
    make_dogs(good, corrupt=False, missing=False, annotation=False)
    nolists = tmp_path / "nolists"
    nolists.mkdir()
    (nolists / "images.tar").write_bytes((good / "images.tar").read_bytes())
    assert "lists.tar not found" in run(nolists)
    # images.tar that is not a tar / a foreign tar.
    (nolists / "lists.tar").write_bytes((good / "lists.tar").read_bytes())
    (nolists / "images.tar").write_bytes(b"garbage" * 100)
    assert "not a readable tar" in run(nolists)
    with tarfile.open(nolists / "images.tar", "w") as tar:
        _add(tar, "photos/cat.jpg", b"x")
    assert "does not look like images.tar" in run(nolists)
    # lists.tar without test_list.mat, or with a .mat that is not one.
    (nolists / "images.tar").write_bytes((good / "images.tar").read_bytes())
    with tarfile.open(nolists / "lists.tar", "w") as tar:
        _add(tar, "train_list.mat", b"MATLAB 5.0 MAT-file, garbage")
        _add(tar, "test_list.mat", _mat([f"{BREEDS[0]}/a.jpg"], [1]))
    assert "train_list.mat is not a readable MATLAB file" in run(nolists)
    with tarfile.open(nolists / "lists.tar", "w") as tar:
        _add(tar, "train_list.mat", _mat([f"{BREEDS[0]}/a.jpg"], [1]))
    assert "lacks test_list.mat" in run(nolists)
    # Truncated images.tar: found while generating, still one ManualDirError, nothing left.
    data = (good / "images.tar").read_bytes()
    (nolists / "lists.tar").write_bytes((good / "lists.tar").read_bytes())
    (nolists / "images.tar").write_bytes(data[: len(data) // 2 + 100])
    assert "truncated or damaged" in run(nolists)
    with pytest.raises(DatasetNotPreparedError):
        registry.data_source("stanford_dogs", "train", tmp_path / "data")
    capsys.readouterr()
    assert prepare.main(["stanford_dogs", "--data_dir", str(tmp_path / "data"),
                         "--manual_dir", str(tmp_path / "empty")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "images.tar" in err[0]
