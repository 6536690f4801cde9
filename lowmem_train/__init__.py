"""lowmem-train: backpropagation in less memory, with strategies chosen from config.

Stable API: ``apply_strategies``, ``available_strategies``, ``check_finite_gradients``, ``StrategyError``,
``NonFiniteError``, ``LowPrecisionUpdates`` (bf16 weights that keep their updates), ``Strategy`` (for plugins).
"""

from .errors import ConfigError, LowmemError, StrategyError
from .finite import NonFiniteError, check_finite_gradients
from .low_precision import LowPrecisionUpdates
from .saved_tensors import SavedBytesMeter, SavedTensorStage
from .strategy import ExampleBatch, Strategy, Touch, apply_strategies, available_strategies, get_strategy_class
from .targets import outermost, repeated_blocks, select_modules

__all__ = [
    "ConfigError",
    "ExampleBatch",
    "LowPrecisionUpdates",
    "LowmemError",
    "NonFiniteError",
    "SavedBytesMeter",
    "SavedTensorStage",
    "Strategy",
    "StrategyError",
    "Touch",
    "apply_strategies",
    "available_strategies",
    "check_finite_gradients",
    "get_strategy_class",
    "outermost",
    "repeated_blocks",
    "select_modules",
]
