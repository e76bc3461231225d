"""One model-uncertainty figure per structure, also for a structure the model left empty.

The model's test-time augmentation gives, per voxel, the standard deviation σ of the structure's probability over
the plain prediction and its flips (:func:`pacsai.learning.infer.segment`). Averaging σ over the predicted mask
alone (as before) gives an empty mask an uncertainty of 0 — "certain" exactly where the model found nothing.

Definition used here: the **candidate region** of a structure is its mask together with every voxel where the
augmented predictions disagree, σ ≥ :data:`HESITANT_SIGMA` (0.05: the passes differ by about 0.1 in probability).
The figure is the mean σ over that region. A present structure is measured over its mask and its hesitant rim; an
empty one over the voxels where the model hesitated to draw it. An empty mask with no hesitant voxel at all has no
region: its uncertainty is ``None`` (not measurable), never 0, and the gate reports the empty structure itself.

The figure is gated relative to the same model's held-out cases (``domain["uncertainty"][structure]["max"]``,
:func:`pacsai.report.gate.uncertainty_reasons`): the spread of flip TTA depends on the model as much as on the
case (a network not trained flip-invariant spreads on every asymmetric organ), so an absolute limit would flag
good contours.
"""

from __future__ import annotations

# The figure itself lives with the training domain: training records it on held-out cases with the same code.
from pacsai.domain import HESITANT_SIGMA, summarize_uncertainty

#: Floor of the review limit on the mean σ over the candidate region; the limit itself is relative to what the
#: model showed on held-out cases (pacsai.report.gate.uncertainty_reasons).
HIGH_UNCERTAINTY = 0.1


__all__ = ["HESITANT_SIGMA", "HIGH_UNCERTAINTY", "summarize_uncertainty"]
