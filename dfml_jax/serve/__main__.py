"""``python -m dfml_jax.serve``: serve one teacher over OIP (see :mod:`dfml_jax.serve`)."""
from dfml_jax.serve import main

if __name__ == "__main__":
    main()
