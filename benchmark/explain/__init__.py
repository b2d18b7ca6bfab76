"""Explanations of a classifier's decision: class activation maps (:mod:`.cam`) and
gradient attributions through captum (:mod:`.methods`), shared by the interpretation
evaluator, the Int defense and the inversion evaluator."""
