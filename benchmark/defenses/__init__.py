"""The defense contract (:mod:`.base`): what a plugin subclasses.  The built-in defenses live
in ``cfbench_baselines`` and register through the same entry points as third-party plugins.

    from cfbench.defenses import AdversarialDefense, Batch, Defense, FitContext, compose
"""

from .base import AdversarialDefense, Batch, Defense, FitContext, compose

__all__ = ["Defense", "AdversarialDefense", "compose", "Batch", "FitContext"]
