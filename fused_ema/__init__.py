"""fused_ema: a fused multi-tensor EMA for PyTorch target networks, teachers and eval EMAs."""
from . import schedules
from .ema import FusedEMA
from .functional import EMAPlan, backend, ema_update_, multi_ema_update_
from .posthoc import PostHocEMA

__all__ = ["EMAPlan", "FusedEMA", "backend", "ema_update_", "multi_ema_update_", "PostHocEMA",
           "schedules"]
__version__ = "0.1.0"
