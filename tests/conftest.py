import os

# Tests exercise sharding on 8 virtual CPU devices; must be set before jax is imported.
# They also compile XLA's CPU code at LLVM optimization level 0: compiling is most of what the
# tests spend (they run each compiled function a few times on tiny inputs), level 0 compiles
# ~30% faster, and it changes neither the HLO passes, the buffer assignment nor the values
# beyond float rounding. Runs of the package itself keep XLA's default level.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
if "--xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " " + TEST_XLA_FLAGS
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The deviceless TPU compiles (libtpu, no TPU) of several test processes at once: without this,
# the first process to load libtpu holds its multi-process lockfile and a second one fails with
# "ABORTED: Internal error when accessing libtpu multi-process lockfile" (two workers of
# `pytest -n 2` under its default distribution compiling Pallas kernels at the same time).
# halluvit_jax.aot sets the same for its own runs.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")

# The README's command runs the files on 2 workers, each file whole on one (`--dist loadfile`, so
# that module fixtures are built once). Files are handed out in collection order: the longest
# go first so that no long file starts last while the other worker idles.
LONGEST_FIRST = ["test_lowering.py", "test_train_reliability.py", "test_layers.py", "test_fused_layers.py",
                 "test_impl_equivalence.py", "test_models.py", "test_train_demo.py", "test_reliability_pieces.py"]


def pytest_collection_modifyitems(items):
    def rank(item):
        name = os.path.basename(str(item.path))
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: the order inside each file is kept
