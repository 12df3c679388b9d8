"""Training machinery shared by every method: augmentation (:mod:`.augment`), PyTorch-semantics
optimisers (:mod:`.optim`) and the compiled-step cache (:mod:`.compile_cache`)."""
