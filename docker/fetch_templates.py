"""Fetch the TemplateFlow files brainage-xai uses into ``TEMPLATEFLOW_HOME``.

Run at image build time (the only time the image goes online), so that a run on a
compute node without internet finds every template it needs::

    TEMPLATEFLOW_HOME=/opt/templateflow python docker/fetch_templates.py

``--list`` prints the files each query selects without downloading anything (it reads
TemplateFlow's bundled file index), which is how the tests check that every query
selects exactly one file. The build fails when a query matches no file or several, or
when a download comes back empty, instead of shipping an image that would try to fetch
at run time.
"""

from __future__ import annotations

import argparse
import os
import sys


def queries() -> list[tuple[str, dict]]:
    """The files the app reads (``brainage_xai.imaging.templates.templateflow_queries``):
    the T1w, brain mask and GM probability map of MNI152NLin2009cAsym at 1 and 2 mm (the
    registration check's reference and the model grid's source) and the Harvard-Oxford
    subcortical atlas with its label table (RoI names). Nothing else is fetched, so an
    image carries no file that no code reads."""
    from brainage_xai.imaging.templates import templateflow_queries

    return templateflow_queries()


def _select(api, template: str, query: dict) -> str:
    found = api.ls(template, **query)
    if len(found) != 1:
        names = [os.path.basename(str(p)) for p in found]
        raise SystemExit(
            f"fetch_templates: query {query} must select exactly one file of "
            f"tpl-{template}, it selected {len(found)}: {names}"
        )
    return str(found[0])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--list", action="store_true", help="print the selected files, download nothing"
    )
    args = parser.parse_args(argv)

    from templateflow import api

    wanted = queries()
    paths = [_select(api, template, query) for template, query in wanted]
    if args.list:
        print("\n".join(paths))
        return 0
    for template, query in wanted:
        api.get(template, **query)
    empty = [p for p in paths if not os.path.isfile(p) or os.path.getsize(p) == 0]
    if empty:
        print(f"fetch_templates: download failed for {empty}", file=sys.stderr)
        return 1
    for p in paths:
        print(f"{os.path.getsize(p):>12}  {p}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
