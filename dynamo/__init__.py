"""dynamo: the depth of Vision Transformers as a dynamical system.

Record every token's trajectory through every block of any timm ViT into a labelled,
lazily-opened zarr store; everything else in dynamo reads that store. The public names below are
imported on first use, so that ``import dynamo`` (and the command line's ``--help``) stays fast.
"""

import importlib
import sys
import types

_HOMES = {
    "ImageSet": "images", "image_set": "images",
    "NotAViTError": "layout", "TokenLayout": "layout", "token_layout": "layout",
    "LoadedModel": "models", "ModelLoadError": "models", "load_model": "models",
    "Partition": "partition",
    "RecordingError": "record", "record": "record",
    "StoreBusyError": "store", "StoreError": "store", "StoreMismatchError": "store", "open_trajectories": "store",
    "image_positions": "store",
    "RaptorFitter": "surrogates", "SurrogateFitter": "surrogates",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'dynamo' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"dynamo.{_HOMES[name]}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``dynamo.record`` the function (as an eager import did) when the submodule is imported."""

    def __setattr__(self, name: str, value) -> None:
        if not (name == "record" and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
