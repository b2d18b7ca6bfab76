"""Execution: training jobs as pure functions of (recipe, subset, seed) (:mod:`.jobs`), the
membership reference models as such jobs (:mod:`.reference`), batched ensembles of such jobs
(:mod:`.batched`), and the executors that run them (:mod:`.local`, :mod:`.ray_executor`,
chosen by name in :mod:`.executors`)."""
