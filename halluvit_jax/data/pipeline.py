"""grain input pipelines over ``tfds.data_source`` (no TensorFlow).

Train::

    source (ArrayRecord, random access, encoded JPEG bytes)
      -> _TrainOrder: infinite index map = per-epoch shuffle (seeded by (shuffle_seed, epoch)),
         optional repeated augmentation, per-process interleaved shard
      -> random_map(Preprocessor)   # per-element np.random.Generator from (seed, index)
      -> to_iter_dataset(ReadOptions(num_threads, prefetch_buffer_size))  # thread pool
      -> batch(local_batch, drop_remainder=True)

Every element is a pure function of ``(seed, shuffle_seed, process_index, position)``, so the
iterator state is just the position: ``get_state()/set_state()`` (or the grain orbax handler)
restore it exactly, augmentation included, independent of thread scheduling.

Eval: each process takes a contiguous ``ceil(n / process_count)`` block, padded to a multiple
of the local batch so all processes run the same number of batches; padding (and any record
that fails to decode) has ``mask=False``.

Checkpointing with orbax (item name ``'data'``)::

    mngr = ocp.CheckpointManager(dir, item_names=('state', 'data'))
    mngr.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=iterator_checkpoint_args_save(it)))
    mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state),
        data=iterator_checkpoint_args_restore(it)))   # restores `it` in place
"""

from __future__ import annotations

import logging
import math
import re
import sys
import threading
from collections.abc import Sequence
from typing import Any

import grain
import ml_collections
import jax
import numpy as np

from halluvit_jax.data import registry, tfds_utils
from halluvit_jax.data.ops import Preprocessor, count_decode_failure

logger = logging.getLogger("halluvit_jax.data")

#: Item name of the data iterator inside the train CheckpointManager.
DATA_ITEM_NAME = "data"


def _process_index_count(process_index, process_count) -> tuple[int, int]:
    if process_index is None or process_count is None:
        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    return int(process_index), int(process_count)


def _local_batch(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple "
                         f"of process_count {process_count}")
    return global_batch_size // process_count


def _seed32(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) & 0xFFFFFFFF for v in values]).generate_state(1)[0])


# --------------------------------------------------------------------------------------------
# Public helpers.
# --------------------------------------------------------------------------------------------


def num_examples(input_cfg, split: str) -> int:
    """Number of examples of ``split`` (e.g. 'train', 'validation', 'train[:10%]')."""
    builder = registry.get_builder(input_cfg.dataset, input_cfg.data_dir)
    tfds_utils.check_prepared(builder, split, input_cfg.dataset)
    return int(builder.info.splits[split].num_examples)


def num_classes(input_cfg) -> int:
    """Number of classes of the dataset's ``label`` feature."""
    builder = registry.get_builder(input_cfg.dataset, input_cfg.data_dir)
    tfds_utils.check_prepared(builder, None, input_cfg.dataset)
    return int(builder.info.features["label"].num_classes)


def fit_splits(input_cfg: Any) -> Any:
    """``input_cfg`` with slices ``split[:N]`` clamped to the prepared split's size (so that
    ``runlocal``'s ``train[:256]`` works on a dataset of 45 images); other splits unchanged."""
    out = None
    for field in ("train_split", "eval_split"):
        split = str(input_cfg.get(field) or "")
        m = re.fullmatch(r"(\w+)\[:(\d+)\]", split)
        if not m:
            continue
        builder = registry.get_builder(input_cfg.dataset, input_cfg.get("data_dir"))
        tfds_utils.check_prepared(builder, m.group(1), input_cfg.dataset)
        n = int(builder.info.splits[m.group(1)].num_examples)
        if int(m.group(2)) > n:
            out = out or ml_collections.ConfigDict(input_cfg.to_dict())
            out[field] = f"{m.group(1)}[:{n}]"
            logger.info("input.%s %s: the prepared split has %d examples; using %s.", field, split, n, out[field])
    return input_cfg if out is None else out


def iterator_checkpoint_args_save(it):
    """orbax ``CheckpointArgs`` saving a grain iterator (use under item name ``'data'``)."""
    return grain.checkpoint.CheckpointSave(it)


def iterator_checkpoint_args_restore(it):
    """orbax ``CheckpointArgs`` restoring *into* ``it`` (a freshly created train iterator)."""
    return grain.checkpoint.CheckpointRestore(it)


# --------------------------------------------------------------------------------------------
# Index maps.
# --------------------------------------------------------------------------------------------


class _TrainOrder(grain.MapDataset):
    """Infinite ``position -> parent[record index]`` map: shuffle, repeat, RA and shard.

    Epoch ``e`` of process ``p`` (``P`` processes, ``R`` = max(1, repeated_aug)):
    the global per-epoch stream is ``perm_e`` (a permutation of ``n`` seeded by
    ``(shuffle_seed, e)``) with every entry repeated ``R`` times consecutively (DeiT RASampler),
    truncated to ``n`` entries; process ``p`` takes stream entries ``p, p+P, p+2P, ...``, i.e.
    ``n // P`` per epoch. With ``R > 1`` the repeats of an image therefore land on different
    processes (or, single-process, on neighbouring batch rows -> different devices).
    """

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, *, shuffle_seed: int, process_index: int,
                 process_count: int, repeats: int = 1, shuffle: bool = True):
        super().__init__(parent)
        self._n = len(parent)
        self._seed = int(shuffle_seed)
        self._p, self._P = process_index, process_count
        self._r = max(1, int(repeats))
        self._shuffle = shuffle
        self.per_epoch = self._n // self._P
        if self.per_epoch == 0:
            raise ValueError(f"split has {self._n} examples < process_count {self._P}")
        self._lock = threading.Lock()
        self._cache: dict[int, np.ndarray] = {}

    def __len__(self) -> int:
        return sys.maxsize

    def __str__(self) -> str:
        return f"_TrainOrder(n={self._n}, shard={self._p}/{self._P}, repeats={self._r})"

    def _perm(self, epoch: int) -> np.ndarray:
        with self._lock:
            perm = self._cache.get(epoch)
            if perm is None:
                if self._shuffle:
                    perm = np.random.default_rng([self._seed, epoch]).permutation(self._n)
                else:
                    perm = np.arange(self._n)
                if len(self._cache) >= 2:
                    self._cache.pop(min(self._cache))
                self._cache[epoch] = perm
            return perm

    def record_index(self, position: int) -> int:
        epoch, j = divmod(int(position), self.per_epoch)
        g = j * self._P + self._p  # position in the global per-epoch stream
        return int(self._perm(epoch)[g // self._r])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self.record_index(index)]


_PAD = {"__pad__": True}


class _EvalOrder(grain.MapDataset):
    """Contiguous per-process block of the eval split, padded with a sentinel record."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, *, process_index: int, process_count: int,
                 local_batch: int):
        super().__init__(parent)
        n = len(parent)
        per = math.ceil(n / process_count)
        self._start = min(n, process_index * per)
        self._stop = min(n, self._start + per)
        self._len = max(1, math.ceil(per / local_batch)) * local_batch

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        i = self._start + int(index)
        # Padding is a sentinel dict (grain's map skips `None` elements).
        return self._parent[i] if i < self._stop else _PAD


# --------------------------------------------------------------------------------------------
# Pipelines.
# --------------------------------------------------------------------------------------------


def _collate(items: Sequence[dict]) -> dict[str, np.ndarray]:
    return {k: np.stack([it[k] for it in items]) for k in items[0]}


def _read_options(input_cfg) -> grain.ReadOptions:
    return grain.ReadOptions(num_threads=int(input_cfg.num_threads),
                             prefetch_buffer_size=int(input_cfg.prefetch_buffer_size))


def create_train_iter(input_cfg, *, global_batch_size: int, seed: int,
                      process_index: int | None = None, process_count: int | None = None):
    """Infinite train iterator of ``{'image': f32 [B, H, W, 3], 'label': int32 [B]}``.

    Images are uint8 instead when ``train_ops`` ends in ``normalize(on_device=1)`` (normalize
    them in the step with :func:`halluvit_jax.data.ops.normalize_on_device`).

    ``B = global_batch_size // process_count`` (remainders dropped); epochs repeat with fresh
    shuffles; deterministic given ``seed`` (and ``input_cfg.shuffle_seed``); supports
    ``get_state()/set_state()`` and the grain orbax handler (see module docstring).
    """
    process_index, process_count = _process_index_count(process_index, process_count)
    local_batch = _local_batch(global_batch_size, process_count)
    src = registry.data_source(input_cfg.dataset, input_cfg.train_split, input_cfg.data_dir)
    shuffle_seed = input_cfg.shuffle_seed if input_cfg.shuffle_seed is not None else seed
    ds = _TrainOrder(grain.MapDataset.source(src), shuffle_seed=shuffle_seed,
                     process_index=process_index, process_count=process_count,
                     repeats=int(input_cfg.repeated_aug or 1))
    pre = Preprocessor(input_cfg.train_ops, input_cfg)
    ds = ds.random_map(pre, seed=_seed32(seed, process_index, 0x7A1))
    it_ds = ds.to_iter_dataset(_read_options(input_cfg))
    it_ds = it_ds.batch(local_batch, drop_remainder=True, batch_fn=_collate)
    return iter(it_ds)


class _EvalPreprocess:
    def __init__(self, input_cfg):
        self.pre = Preprocessor(input_cfg.eval_ops, input_cfg)
        s = self.pre.size
        self._pad = {"image": np.zeros((s, s, 3), self.pre.dtype), "label": np.int32(0),
                     "mask": np.bool_(False)}

    def __call__(self, record: dict) -> dict:
        if "__pad__" in record:
            return self._pad
        # Eval ops are deterministic; a fixed generator keeps the op signature uniform.
        image = self.pre.apply(record["image"], np.random.default_rng(0))
        if image is None:
            count_decode_failure(record)
            return {**self._pad, "label": np.int32(record["label"])}
        return {"image": image, "label": np.int32(record["label"]), "mask": np.bool_(True)}


def create_eval_iter(input_cfg, *, global_batch_size: int, process_index: int | None = None,
                     process_count: int | None = None):
    """One pass over the eval split: ``{'image', 'label', 'mask'}`` batches of the local size.

    The last batch is padded to full size; ``mask`` (bool ``[B]``) marks real examples, so
    ``sum(metric * mask) / sum(mask)`` summed over processes is exact. All processes yield the
    same number of batches. The returned object is re-iterable (each ``iter()`` is a new pass).
    """
    process_index, process_count = _process_index_count(process_index, process_count)
    local_batch = _local_batch(global_batch_size, process_count)
    src = registry.data_source(input_cfg.dataset, input_cfg.eval_split, input_cfg.data_dir)
    ds = _EvalOrder(grain.MapDataset.source(src), process_index=process_index,
                    process_count=process_count, local_batch=local_batch)
    ds = ds.map(_EvalPreprocess(input_cfg))
    it_ds = ds.to_iter_dataset(_read_options(input_cfg))
    return it_ds.batch(local_batch, drop_remainder=False, batch_fn=_collate)


def train_order_indices(input_cfg, *, seed: int, num: int, process_index: int = 0,
                        process_count: int = 1) -> list[int]:
    """Record indices of the first ``num`` train elements of a process (for tests/inspection)."""
    src = registry.data_source(input_cfg.dataset, input_cfg.train_split, input_cfg.data_dir)
    shuffle_seed = input_cfg.shuffle_seed if input_cfg.shuffle_seed is not None else seed
    order = _TrainOrder(grain.MapDataset.source(src), shuffle_seed=shuffle_seed,
                        process_index=process_index, process_count=process_count,
                        repeats=int(input_cfg.repeated_aug or 1))
    return [order.record_index(i) for i in range(num)]


__all__: list[Any] = [
    "DATA_ITEM_NAME",
    "create_eval_iter",
    "create_train_iter",
    "iterator_checkpoint_args_restore",
    "iterator_checkpoint_args_save",
    "num_classes",
    "num_examples",
    "train_order_indices",
]
