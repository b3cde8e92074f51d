"""Reading, writing and converting checkpoints of transformers, torchvision, timm, mmdet and
detectron2, and saying what a source named by text is (:func:`resolve_source`)."""

from .architecture import describe, infer_config, peer_layout_of, same_architecture
from .export import export_problems, peer_state_dict
from .files import read_state_dict, write_checkpoint
from .layouts import PeerLayout, from_canonical, to_canonical
from .loading import CheckpointMismatchError, LoadReport, load_checkpoint, load_placed
from .resolve import Source, resolve_source

__all__ = [
    "CheckpointMismatchError",
    "LoadReport",
    "PeerLayout",
    "Source",
    "describe",
    "export_problems",
    "from_canonical",
    "infer_config",
    "load_checkpoint",
    "load_placed",
    "peer_layout_of",
    "peer_state_dict",
    "read_state_dict",
    "resolve_source",
    "same_architecture",
    "to_canonical",
    "write_checkpoint",
]
