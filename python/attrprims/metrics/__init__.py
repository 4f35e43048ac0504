"""Evaluation of attributions: the linear datamodeling score (LDS) and the retraining harness it needs."""

from .lds import LDSResult, lds
from .retrain import retrain_outputs, subset_masks, subset_seed

__all__ = ["LDSResult", "lds", "retrain_outputs", "subset_masks", "subset_seed"]
