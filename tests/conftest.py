"""Test set-up: 8 simulated CPU devices, fixed before jax is imported anywhere."""

import os

# Must happen before the first `import jax` (a later change raises): meshes in the tests need 8 devices.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
# The tests' models are tiny, so compiling is most of their time; LLVM's optimisations of the generated CPU code
# are what take longest and buy nothing here (the suite on 2 cores: 28% less time on the trainer and dropout
# files, docs/benchmarks.md "The CPU test suite"). HLO optimisation, and so every program's structure, is kept.
if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
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

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def synthetic_data(tmp_path_factory):
  """30 short synthetic videos at 64 px, their shards and the real Qwen2 tokenizer: the trainer-level tests'
  data (tests/train_setup.py), made once per test process."""
  # Here, not at the top: every test process loads this file, most of them never need TFDS or OpenCV.
  from hico_jax.data import synthetic, tfds_longvid, tokenizer  # pylint: disable=import-outside-toplevel
  root = tmp_path_factory.mktemp("synthetic")
  dataset = synthetic.make_dataset(root / "videos", num_videos=30, seed=0, size=64, fps_range=(4, 8),
                                   duration_range=(4.0, 12.0))
  tfds_longvid.build(str(dataset), str(root / "shards"), log=lambda _: None)
  tokenizer.build_qwen2_tokenizer_json(root / "tokenizer")
  return root
