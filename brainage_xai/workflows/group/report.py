"""Stage ``report``: ``report.html``, the group section of every ``sub-X.html`` and the
boilerplate ``logs/CITATION.*`` of what ran."""

from __future__ import annotations

import json
import logging
import os

from ...bids.derivatives import citation_path, report_path, sidecar_path
from ...report.group import read_context, render_group_report
from ...report.subject import subject_page, subject_rois
from ...utils.io import write_text
from ..outputs import write_citation
from .explanations import template_grid
from .runner import GroupContext

LOGGER = logging.getLogger("brainage_xai.group")


def stage_report(ctx: GroupContext) -> None:
    """Render the report from the files of ``group/``; redo the subject pages' section."""
    config, out = ctx.config, ctx.out
    pages = {s: report_path(config.output_dir, s) for s in ctx.subjects}
    # the explanations' key: a report shows the explanations it was made from
    key = ctx.key(explanations=ctx.explanations_key, prefix=out.prefix)
    citations = [citation_path(config.output_dir, ext) for ext in ("md", "html", "bib")]
    # A participant re-run writes sub-X.html without the group section, and CITATION.* of
    # its level only: redo them then.
    if ctx.is_done("report", key, [out.report, *pages.values(), *citations]) and all(
        'id="subject-rois"' in p.read_text(encoding="utf-8") for p in pages.values()
    ) and "(group level)" in citations[0].read_text(encoding="utf-8"):
        return
    template_img, mask, background = template_grid(ctx)
    import nibabel as nib
    import numpy as np

    mask_img = None if mask is None else nib.Nifti1Image(mask.astype(np.uint8), template_img.affine)
    context = read_context(out, config, input_shape=ctx.input_shape, template_name=ctx.template.name,
                           background_img=background, mask_img=mask_img, subject_pages=pages,
                           template=ctx.template)
    render_group_report(context, out.report)
    # the boilerplate of both levels as they ran, from the text the report's methods show
    write_citation(config.output_dir, context["boilerplate"])
    target = context["target"]
    for subject, page in pages.items():
        meta = json.loads(sidecar_path(ctx.paths[ctx.subjects.index(subject)]).read_text())
        section = subject_rois(f"sub-{subject}", context["predictions"], context["loadings"], target,
                               report_href=os.path.relpath(out.report, page.parent))
        write_text(page, subject_page(config, subject, ctx.template, meta, group=section))
    LOGGER.info("report: %s and %d subject pages", out.report, len(pages))
    ctx.mark_done("report", key, [out.report, *pages.values(), *citations])
