"""halluvit-jax: Vision Transformers with attention-map hallucination (hMHSA) and FFN compaction (cFFN).

Public API::

    import halluvit_jax as hv
    model = hv.create_model("deit_small_hal")            # hal=hv.HalConfig(...), impl="auto"
    deploy_vars = hv.reparameterize(train_vars)
    hv.layers.HalAttention, hv.layers.CompactMlp  # to use in your own Flax models
    loaded = hv.load("runs/demo")  # a training workdir, converted dir or deploy export
    loaded.model.apply(loaded.variables, x)  # loaded.input: image size, crop, mean/std
"""

from halluvit_jax import layers
from halluvit_jax.layers import HalConfig
from halluvit_jax.loading import load
from halluvit_jax.models import create_model, deploy_form, get_input_config, list_models
from halluvit_jax.reparam import reparameterize

__version__ = "0.1.0"

__all__ = [
    "HalConfig",
    "create_model",
    "deploy_form",
    "get_input_config",
    "layers",
    "list_models",
    "load",
    "reparameterize",
]
