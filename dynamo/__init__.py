"""dynamo: the depth of Vision Transformers as a dynamical system.

Record every token's trajectory through every block of any timm ViT into a labelled,
lazily-opened zarr store; everything else in dynamo reads that store.
"""

from dynamo.images import ImageSet, image_set
from dynamo.layout import NotAViTError, TokenLayout, token_layout
from dynamo.models import LoadedModel, ModelLoadError, load_model
from dynamo.partition import Partition
from dynamo.record import RecordingError, record
from dynamo.store import StoreBusyError, StoreError, StoreMismatchError, open_trajectories
from dynamo.surrogates import RaptorFitter, SurrogateFitter

__all__ = [
    "ImageSet",
    "LoadedModel",
    "ModelLoadError",
    "NotAViTError",
    "Partition",
    "RaptorFitter",
    "RecordingError",
    "StoreBusyError",
    "StoreError",
    "StoreMismatchError",
    "SurrogateFitter",
    "TokenLayout",
    "image_set",
    "load_model",
    "open_trajectories",
    "record",
    "token_layout",
]
