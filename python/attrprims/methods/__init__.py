"""Attribution methods composed from the primitives, all with featurize / score / self_score."""

from .trak import TRAK

__all__ = ["TRAK"]
