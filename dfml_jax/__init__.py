"""dfml_jax: data-free meta-learning and distillation from black-box APIs."""
__version__ = "0.1.0"
