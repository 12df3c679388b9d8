"""Training machinery shared by every method: augmentation (:mod:`.augment`), PyTorch-semantics
optimisers (:mod:`.optim`), the compiled-step cache (:mod:`.compile_cache`) and the one run loop
of every method (:mod:`.run_loop`: :class:`~dfml_jax.training.run_loop.Method` and
:func:`~dfml_jax.training.run_loop.run`; the methods are listed in
:data:`dfml_jax.methods.METHODS`)."""
