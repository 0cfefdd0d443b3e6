"""The ``brainage-xai`` command line: :mod:`.parser` parses and checks, :mod:`.run` runs."""

from .parser import build_parser, parse_args
from .run import main

__all__ = ["build_parser", "main", "parse_args"]
