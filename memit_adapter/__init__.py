"""memit_adapter: mass-edit the facts of a transformer LM with MEMIT and ship the edits as an adapter.

Usage::

    from memit_adapter import EditRequest, MemitConfig, compute_edits

    pack = compute_edits(model, tokenizer, [EditRequest("{} plays the sport of", "Michael Jordan", " baseball")],
                         MemitConfig.for_model(model), corpus="wiki_sample.txt", cache_dir="stats-cache")
    with pack.applied(model):          # toggled in the forward pass, weights untouched
        ...
    pack.save_pretrained("jordan-baseball")   # a PEFT LoRA folder: stock model.load_adapter() reads it

    # the paper's baselines, same inputs, same packs: compute_rome_edits(...) (RomeConfig), compute_ft_edits(...)

Importing this package reads no file and touches no network.
"""

from .apply import MergeReport, active_packs
from .arch import ARCHITECTURES, ArchSpec, get_arch_spec, register_architecture
from .config import MemitConfig
from .counterfact import load_counterfact
from .engine import compute_edits
from .errors import (
    ConfigError,
    ConflictingRequestsError,
    FingerprintMismatchError,
    InvalidRequestError,
    MemitError,
    ModelError,
    OverwriteError,
    PackError,
    StatisticsError,
    UnsupportedArchitectureError,
    WeightsChangedError,
)
from .evaluation import CounterFactResult, evaluate_counterfact, evaluate_pack
from .finetune import compute_ft_edits
from .method_configs import FtConfig, RomeConfig
from .pack import EditPack, LayerDelta
from .requests import EditRequest
from .rome import compute_rome_edits
from .stats import SecondMoment, StatsCache, collect_stats
from .tracing import suggest_layers, trace_fact, trace_facts, trace_severed

__version__ = "0.1.0"

__all__ = [
    "ARCHITECTURES",
    "ArchSpec",
    "ConfigError",
    "ConflictingRequestsError",
    "CounterFactResult",
    "EditPack",
    "EditRequest",
    "FingerprintMismatchError",
    "FtConfig",
    "InvalidRequestError",
    "LayerDelta",
    "MemitConfig",
    "MemitError",
    "MergeReport",
    "ModelError",
    "OverwriteError",
    "PackError",
    "RomeConfig",
    "SecondMoment",
    "StatisticsError",
    "StatsCache",
    "UnsupportedArchitectureError",
    "WeightsChangedError",
    "active_packs",
    "collect_stats",
    "compute_edits",
    "compute_ft_edits",
    "compute_rome_edits",
    "evaluate_counterfact",
    "evaluate_pack",
    "get_arch_spec",
    "load_counterfact",
    "register_architecture",
    "suggest_layers",
    "trace_fact",
    "trace_facts",
    "trace_severed",
]
