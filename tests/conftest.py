"""Root test configuration: 8 emulated CPU devices, set before any JAX backend use."""
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(os.path.dirname(__file__), ".tfds_never_download"))

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)
