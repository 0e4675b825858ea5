"""Test set-up: 8 simulated CPU devices, fixed before jax is imported anywhere."""

import os

# Must happen before the first `import jax` (a later change raises): meshes in the tests need 8 devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")          # nothing may reach a model hub
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# XLA:CPU executables loaded from JAX's persistent compilation cache abort the process now and then (seen here,
# docs/benchmarks.md "The CPU test suite"): no test may run with one, even where a developer's shell sets it.
os.environ.pop("JAX_COMPILATION_CACHE_DIR", None)

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")  # parity tests compare fp32 to 1e-4
assert jax.device_count() == 8, f"tests need 8 simulated devices, got {jax.device_count()}"
