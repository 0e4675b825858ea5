"""Test set-up: 8 simulated CPU devices, fixed before jax is imported anywhere."""

import os
import shutil
import tempfile

# Must happen before the first `import jax` (a later change raises): meshes in the tests need 8 devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Many tests compile the same small programs (the tiny model's steps, its forward on a mesh): one compilation
# cache for the whole run, shared by the xdist workers (they inherit this environment from the controller,
# which makes the folder and removes it at the end). test_train.py alone: 5:12 -> 3:51 on 2 cores. A hit
# gives the executable a miss would have compiled, so no test sees a difference.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="hico_jax_test_compile_cache_")
  _OWN_COMPILATION_CACHE = os.environ["JAX_COMPILATION_CACHE_DIR"]
else:
  _OWN_COMPILATION_CACHE = None
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")   # the tests' compiles are short
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # parity tests compare fp32 to 1e-4
assert jax.device_count() == 8, f"tests need 8 simulated devices, got {jax.device_count()}"


def pytest_unconfigure(config):
  del config
  if _OWN_COMPILATION_CACHE:   # the process that made the cache folder (the controller, or a run without xdist)
    shutil.rmtree(_OWN_COMPILATION_CACHE, ignore_errors=True)
