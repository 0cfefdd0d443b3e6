"""HTML reports rendered with Jinja2 (autoescape on).

Templates live under ``brainage_xai/data/report/`` (loaded with :mod:`importlib.resources`):
``base.html`` is the page, ``partials/`` holds the sections, ``subject.html`` is the
per-subject report ``sub-X.html`` (with the group level's section
``group_subject_rois.html`` once the group level has run) and ``group.html`` the group
report (:mod:`brainage_xai.report.group`). Values from datasets (file names, labels, JSON) are
escaped by Jinja2, so a crafted file name cannot inject markup.
"""

from __future__ import annotations

import datetime as _dt
import functools
from importlib import resources

from .._version import __version__


@functools.lru_cache(maxsize=1)
def environment():
    """The Jinja2 environment of the package's report templates (autoescape on)."""
    import jinja2

    folder = resources.files("brainage_xai") / "data" / "report"
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(folder)),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.globals.update(version=__version__)
    env.filters["fmt"] = _fmt
    return env


def _fmt(value, digits: int = 3):
    """Numbers rounded for reading; anything else as is."""
    if isinstance(value, bool) or value is None:
        return "n/a" if value is None else ("yes" if value else "no")
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    if isinstance(value, (list, tuple)):
        return " × ".join(str(_fmt(v, digits)) for v in value)
    return value


def render(template_name: str, **context) -> str:
    """Render one report template with ``context``."""
    context.setdefault("generated", _dt.datetime.now().strftime("%Y-%m-%d %H:%M"))
    return environment().get_template(template_name).render(**context)

