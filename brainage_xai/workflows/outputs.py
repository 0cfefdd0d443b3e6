"""The dataset-level files of OUTPUT_DIR, written by every level at its start."""

from __future__ import annotations

import os

from ..bids.derivatives import (
    DEFAULT_SPACE,
    citation_path,
    format_resolution,
    write_bidsignore,
    write_dataset_description,
)
from ..report.methods import citation_text
from ..utils.io import write_text


def init_output_dir(
    output_dir: str | os.PathLike,
    bids_dir: str | os.PathLike,
    resolution: float = 2,
    space: str = DEFAULT_SPACE,
    derivatives: dict | None = None,
) -> None:
    """Write the dataset-level files of OUTPUT_DIR (description, .bidsignore, citation)."""
    write_dataset_description(output_dir, bids_dir, derivatives)
    write_bidsignore(output_dir)
    write_text(citation_path(output_dir), citation_text(resolution=format_resolution(resolution), space=space))
