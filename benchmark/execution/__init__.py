"""Execution: training jobs as pure functions of (recipe, subset, seed) (:mod:`.jobs`), the
membership reference models as such jobs (:mod:`.reference`), and the executors that run
them (:mod:`.local`; room for Ray)."""
