"""memit_adapter: mass-edit the facts of a transformer LM with MEMIT and ship the edits as an adapter.

Importing this package reads no file and touches no network.
"""

from .arch import ARCHITECTURES, ArchSpec, get_arch_spec, register_architecture
from .config import MemitConfig
from .engine import compute_edits
from .errors import (
    ConfigError,
    ConflictingRequestsError,
    FingerprintMismatchError,
    InvalidRequestError,
    MemitError,
    PackError,
    StatisticsError,
    UnsupportedArchitectureError,
)
from .pack import EditPack, LayerDelta
from .requests import EditRequest
from .stats import SecondMoment, StatsCache, collect_stats

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ConfigError",
    "ConflictingRequestsError",
    "EditPack",
    "EditRequest",
    "FingerprintMismatchError",
    "InvalidRequestError",
    "LayerDelta",
    "MemitConfig",
    "MemitError",
    "PackError",
    "SecondMoment",
    "StatisticsError",
    "StatsCache",
    "UnsupportedArchitectureError",
    "collect_stats",
    "compute_edits",
    "get_arch_spec",
    "register_architecture",
]
