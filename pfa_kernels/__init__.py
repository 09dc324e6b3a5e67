"""pfa_kernels: Product Feedback Alignment layers at the cost of backpropagation.

    import pfa_kernels as pk
    layer = pk.PFAConv2d(64, 128, 3, padding=1, expand_ratio=10)
    model = pk.convert(torchvision.models.resnet18())  # projected wherever exact: BP's cost with SGD
    pk.metrics.report(model)
"""

from . import baselines, dfa, dispatch, functional, metrics, planner, reference, testing
from .attention import PFAMultiheadAttention
from .convert import ConversionRecord, convert
from .feedback import ExplicitFeedback, PFAFeedback, ProjectedFeedback
from .feedback_choice import make_feedback
from .model_feedback import feedback_weights
from .nn import PFAConv1d, PFAConv2d, PFAConv3d, PFALinear
from .parametrize import check_optimizer, reparametrize
from .unconvert import UnconversionRecord, bp_state_dict, unconvert
from .verify import VerifyReport, verify

__all__ = [
    "ConversionRecord",
    "baselines",
    "dfa",
    "dispatch",
    "PFAConv1d",
    "PFAConv2d",
    "PFAConv3d",
    "PFAFeedback",
    "ExplicitFeedback",
    "ProjectedFeedback",
    "make_feedback",
    "PFALinear",
    "PFAMultiheadAttention",
    "check_optimizer",
    "convert",
    "feedback_weights",
    "functional",
    "metrics",
    "planner",
    "reference",
    "reparametrize",
    "testing",
    "UnconversionRecord",
    "bp_state_dict",
    "unconvert",
    "verify",
    "VerifyReport",
]
__version__ = "0.1.0"
