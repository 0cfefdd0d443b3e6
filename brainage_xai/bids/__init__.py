"""The input dataset (PyBIDS queries, ``participants.tsv``, validation) and the names of
every output (:mod:`.derivatives`)."""

from .layout import (
    MAP_QUERIES,
    build_layout,
    default_derivatives,
    find_maps,
    layout_subjects,
    map_query,
    select_subjects,
    strip_label,
)
from .targets import load_targets
from .validation import find_validator, validate_dataset

__all__ = [
    "MAP_QUERIES",
    "build_layout",
    "default_derivatives",
    "find_maps",
    "find_validator",
    "layout_subjects",
    "load_targets",
    "map_query",
    "select_subjects",
    "strip_label",
    "validate_dataset",
]
