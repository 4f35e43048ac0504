"""Evaluation of attributions: LDS, leave-one-out correlation, noisy-label detection, remove-and-retrain, and the
retraining harness they need."""

from .lds import LDSResult, lds
from .loo import LOOResult, loo
from .noisy_label import detection_curve, noisy_label_auc
from .removal import RemovalResult, remove_and_retrain
from .retrain import retrain_outputs, subset_masks, subset_seed

__all__ = ["LDSResult", "LOOResult", "RemovalResult", "detection_curve", "lds", "loo", "noisy_label_auc",
           "remove_and_retrain", "retrain_outputs", "subset_masks", "subset_seed"]
