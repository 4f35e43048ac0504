"""Attribution methods composed from the primitives, all with featurize / score / self_score.

Scores are [n_test, n_train] (rows are targets), positive where the training example helps the target.
"""

from .gradient_similarity import GradCos, GradDot, GradientSimilarity, TracInCP
from .influence import InfluenceFunction
from .representer import RepresenterPoints
from .trak import TRAK

__all__ = ["GradCos", "GradDot", "GradientSimilarity", "InfluenceFunction", "RepresenterPoints", "TRAK", "TracInCP"]
