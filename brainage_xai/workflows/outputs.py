"""The dataset-level files of OUTPUT_DIR: written by every level (the description and
``.bidsignore`` at its start, the citation boilerplate of what it ran)."""

from __future__ import annotations

import os

from ..bids.derivatives import citation_path, write_bidsignore, write_dataset_description
from ..report.methods import Boilerplate
from ..utils.io import write_text


def init_output_dir(
    output_dir: str | os.PathLike,
    bids_dir: str | os.PathLike,
    derivatives: dict | None = None,
) -> None:
    """Write the dataset-level files of OUTPUT_DIR (description, .bidsignore)."""
    write_dataset_description(output_dir, bids_dir, derivatives)
    write_bidsignore(output_dir)


def write_citation(output_dir: str | os.PathLike, boilerplate: Boilerplate) -> None:
    """``logs/CITATION.md``, ``.html`` and ``.bib``: the boilerplate of what ran."""
    write_text(citation_path(output_dir, "md"), boilerplate.markdown())
    write_text(citation_path(output_dir, "html"), boilerplate.html())
    write_text(citation_path(output_dir, "bib"), boilerplate.bibtex())
