"""attrprims: fast, composable primitives for training-data attribution.

Primitives take and return torch tensors and run compiled C++ (CPU) or CUDA kernels; methods and metrics
are composed from them. `build_info()` says what was built, `cuda_available()` whether CUDA kernels can run,
`set_cpu_kernels()` which instruction set the CPU kernels use.
"""

from ._backend import CudaStatus, build_info, cuda_available, set_cpu_kernels
from ._core import build_info as _core_info
from . import ensemble
from .ensemble import EnsembleAccumulator
from .factored_projection import project_factored
from .factored_projector import FactoredProjector
from .gram import FeatureGram, GramAccumulator
from .hvp import HessianOperator, ggn_vp, hvp
from .ihvp import SOLVERS, IHVPResult, IHVPSolver, ihvp_solver
from .param_layout import ParamLayout, param_layout
from .per_sample_grads import per_sample_grads, project_grads
from .projection import Projector, project, project_transpose
from .scoring import Ranked, score
from .store import FeatureStore
from .tasks import (BinaryClassification, ContrastiveImageText, LanguageModeling, MultiClassClassification, Task,
                    TextClassification)
from . import groups, methods, metrics
from .methods import TRAK, GradCos, GradDot, InfluenceFunction, RepresenterPoints, TracInCP

__version__ = _core_info["version"]

__all__ = ["BinaryClassification", "ContrastiveImageText", "CudaStatus", "EnsembleAccumulator", "FactoredProjector",
           "FeatureGram", "FeatureStore", "GradCos", "GradDot", "GramAccumulator", "HessianOperator", "IHVPResult",
           "IHVPSolver", "InfluenceFunction", "LanguageModeling", "MultiClassClassification", "ParamLayout",
           "Projector", "Ranked", "RepresenterPoints", "SOLVERS", "TRAK", "Task", "TextClassification", "TracInCP",
           "__version__", "build_info", "cuda_available", "ensemble", "ggn_vp", "groups", "hvp", "ihvp_solver",
           "methods", "metrics", "param_layout", "per_sample_grads", "project", "project_factored", "project_grads",
           "project_transpose", "score", "set_cpu_kernels"]
