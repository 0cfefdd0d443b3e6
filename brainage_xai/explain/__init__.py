"""Dataset-level explanations of a trained network from its decomposition.

Where the RoIs are (:mod:`.rois`), how their loadings follow the target (:mod:`.loadings`),
the GradCAM baseline (:mod:`.gradcam`), whether the network relies on them
(:mod:`.occlusion`) and where in the input their loadings come from
(:mod:`.backprojection`).
"""
