__version__ = "0.1.0"

from .running import RunningBatchNorm, register_fast_step
from .skipping import SkippingRunningBatchNorm
from . import fused  # noqa: F401 -- registers the fast training steps (course order: notebook 07 plugs into notebook 05)
from .convert import convert_to_rbn, convert_to_bn, SyncRunningBatchNorm

__all__ = ['RunningBatchNorm', 'SkippingRunningBatchNorm', 'SyncRunningBatchNorm', 'convert_to_rbn', 'convert_to_bn', 'register_fast_step']
