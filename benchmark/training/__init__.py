"""Training: the context a defense receives (:mod:`.context`), the one shared loop
(:mod:`.loop`), checkpoints (:mod:`.checkpoint`) and the recipe that builds and fits a model
exactly as a run does, for targets and reference models alike (:mod:`.recipe`)."""

from .checkpoint import CKPT_NAME
from .context import Batch, FitContext
from .loop import augment, lr_at, make_optimizer, train

__all__ = ["CKPT_NAME", "Batch", "FitContext", "augment", "lr_at", "make_optimizer", "train"]
