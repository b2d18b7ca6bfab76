"""cfbench: accuracy / adversarial robustness / membership privacy trade-offs of image classifiers.

The import name is ``cfbench``; the source lives in the repository's ``benchmark/`` folder.
Data flows one way: config -> data -> model -> defense.fit -> evaluators -> record -> store.
"""

__version__ = "0.1.0"

#: Version of the plugin API.  A plugin declares ``api_version`` (an int); a plugin whose
#: major API differs from this one is refused with a clear message.
PLUGIN_API_VERSION = 1


def load_model(run_dir, device: str = "cpu"):
    """Load the final, evaluated model of a finished run (see :func:`cfbench.store.models.load_model`:
    the run verified when it saved it that the reloaded model reproduces its logits exactly)."""
    from .store.models import load_model as _load

    return _load(run_dir, device)


__all__ = ["__version__", "PLUGIN_API_VERSION", "load_model"]
