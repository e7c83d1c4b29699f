r"""Transfer an ImageNet-trained model to another dataset (paper section 3.3, Table 8):
``model=PRESET,dataset=NAME,init=DIR``.

Built on configs/finetune.py (``model``: the preset whose model and augmentations are kept, any
of finetune.py's presets, baselines included; ``init``: the checkpoint). What changes:

- **Data** (``dataset``): ``cifar100`` or ``stanford_dogs`` (prepared from their archives,
  docs/data.md), or any prepared TFDS image-classification dataset by name (``train_split`` /
  ``eval_split`` arguments; ``train`` / ``test`` unless known), e.g. the embedded digits
  ``halluvit_digits`` (``dataset=demo``).
- **Resolution** (``res`` overrides): CIFAR-100 at 384x384, Stanford Dogs at 448x448 as in the
  paper's Table 8; other datasets, and ``model=demo``, at the preset's resolution. DeiT is built
  for that resolution and its position embeddings are resampled from the checkpoint's grid
  (bicubic, antialiased, as timm); PVTv2 and Next-ViT have none and take any resolution.
- **Head**: a new classifier of the dataset's class count, zero-initialized (``init_reinit_regex``
  ``^head/``; the trainer logs it), also when the class count happens to equal the checkpoint's.
  Zeros are big_vision's transfer choice (``head_zeroinit``): the model starts at the uniform
  prediction. DeiT's main.py instead drops the checkpoint's head and keeps the model's
  trunc-normal(0.02) init; after a few steps the two do not differ.
- **cFFN of a deploy export**: a ``convert deploy`` export (or a workdir of a folded model) is
  *trained folded* (``model.hal.deploy=True``): its cFFN factors are single Dense layers with a
  bias, which train as they are and compute exactly the exported function. Re-expanding them
  into training branches would not be exact: a branch's BatchNorm normalizes by the batch's
  statistics in training, so "the folded kernel in branch 0, BatchNorm as identity" is not the
  same function once trained, and the other branches would start from nothing. Fine-tuning
  folded gives up only the multi-branch training dynamics. A ``convert timm`` / ``convert hal``
  directory or a training workdir in training form is fine-tuned in training form.

**Recipe** (ImageNet presets). From the paper we have the datasets and resolutions (Table 8), no
fine-tuning hyper-parameters. DeiT's paper has none either (deit#175: "Cannot find it in the
paper?"); its author gave them on the issue trackers, and we take his AdamW recipe for CIFAR-100
(facebookresearch/deit#117 for ResMLP on CIFAR-10/100, facebookresearch/dino#144 for ViT-B on
CIFAR-100): batch 768, lr 5e-6 scaled by batch/512 as DeiT's main.py does (7.5e-6), 1000 epochs,
cosine, 5 warm-up epochs from 1e-6, and, as the preset already has them (DeiT-S's values):
weight decay 0.05 ("keep the weight decay used for ImageNet training", deit#45), repeated
augmentation, label smoothing 0.1, RandAugment rand-m9-mstd0.5-inc1, Mixup 0.8, CutMix 1.0,
drop-path 0.1. Not used: deit#45's recipe for CIFAR-10 and Cars (SGD, lr 0.01, weight decay 1e-4,
no random erasing or drop-path); the CIFAR-100 answers use AdamW, and one optimizer then serves
pretraining, fine-tuning and transfer (``--config.optim.name=sgd`` switches). Chosen here:
``min_lr`` 1e-6 (DeiT's default 1e-5 lies above the peak lr, so its cosine would rise), the
preset's random erasing (0.25) and eval crop (0.875, as DeiT's datasets.py for inputs above
32 px), an evaluation every 10 epochs, and the same recipe for Stanford Dogs, PVTv2 and Next-ViT
(no published transfer recipe for them).

``model=demo`` keeps finetune.py's demo recipe (10 epochs, lr 5e-4 at batch 64) and the digits'
input statistics; ``runlocal``: a smoke run (config_helpers.runlocal) on the chosen dataset.

  python -m halluvit_jax.data.prepare cifar100 --manual_dir MANUAL --data_dir DATA
  python train.py --config configs/transfer.py:model=deit_s_hal,dataset=cifar100,init=converted/deit_small_hal,data_dir=DATA \
      --workdir runs/deit_s_hal_cifar100
  python train.py --config configs/transfer.py:model=deit_s_hal,dataset=stanford_dogs,init=runs/deit_s_hal,res=384 ...
  python train.py --config configs/transfer.py:model=demo,dataset=cifar100,init=runs/demo,res=48 --workdir /tmp/t
"""

from halluvit_jax import config_helpers as ch
from halluvit_jax.checkpoint.io import cffn_folded

#: dataset -> (resolution in the paper's Table 8 or None: the preset's, train split, eval split).
DATASETS = {
    "cifar100": (384, "train", "test"),
    "stanford_dogs": (448, "train", "test"),
    "halluvit_digits": (None, "train", "validation"),
}


def get_config(arg=None):
    a = ch.parse_arg(arg, model="deit_s_hal", dataset="cifar100", init="", res=0, epochs=0.0,
                     train_split="", eval_split="", runlocal=False, data_dir="")
    if not a.init and not a.runlocal:
        raise ValueError(f"Transfer needs init=<training workdir, converted dir or deploy export>, e.g. "
                         f"--config configs/transfer.py:model={a.model},dataset={a.dataset},init=DIR.")
    dataset = "halluvit_digits" if a.dataset == "demo" else a.dataset
    c = ch.load_config("finetune.py", ",".join(filter(None, [
        f"model={a.model}", f"init={a.init}" if a.init else "", f"epochs={a.epochs}" if a.epochs else "",
        "runlocal" if a.runlocal else "", f"data_dir={a.data_dir}" if a.data_dir else ""])), relative_to=__file__)

    res, train_split, eval_split = DATASETS.get(dataset, (None, "train", "test"))
    res = a.res or (None if a.model == "demo" else res) or c.input.image_size
    c.input.dataset = dataset
    c.input.data_dir = a.data_dir or c.input.get("data_dir")
    c.input.train_split = a.train_split or train_split
    c.input.eval_split = a.eval_split or eval_split
    c.input.image_size = res
    c.prepare_demo = dataset == "halluvit_digits"
    if c.model_name.startswith("deit"):
        c.model.img_size = res  # pos_embed resampled from the checkpoint's grid when loading
    c.init_from = a.init  # (finetune.py's demo default does not apply; none: a from-scratch smoke run)
    c.init_reinit_regex = "^head/"  # a new, zero-initialized classifier
    if c.model.get("hal") and cffn_folded(a.init):
        c.model.hal.deploy = True  # a deploy export trains folded (see above)

    if a.model != "demo":  # DeiT's CIFAR-100 transfer recipe (see above)
        c.global_batch_size = 768
        c.total_epochs = a.epochs or 1000.0
        c.optim.name = "adamw"
        c.optim.lr = 5e-6
        c.optim.lr_base_batch_size = 512
        c.optim.warmup_epochs = 5.0
        c.optim.warmup_init_lr = 1e-6
        c.optim.min_lr = 1e-6
        c.eval_every_epochs = 10.0
    if a.runlocal:
        ch.runlocal(c)  # again: batch, steps and split slices of the transfer dataset
    return c
