"""What the installed transformers/peft pair allows, said in one line when it refuses something we show.

transformers gates its adapter methods (``add_adapter``, ``set_adapter``, ``enable_adapters``,
``disable_adapters``, ``active_adapters``) behind a minimum peft release, ``MIN_PEFT_VERSION`` in
``transformers.integrations.peft``. A release can raise that floor above the newest peft on the registry
(transformers 5.24 asks for peft 0.22 while the newest is 0.21.2); those methods then raise
``ValueError`` while ``model.load_adapter`` and PEFT's own ``PeftModel`` API keep working. Code that
toggles a loaded pack asks :func:`stock_adapter_refusal` first and, when it gets a reason, says it and
uses the ``PeftModel`` API instead.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version


def stock_adapter_refusal() -> str | None:
    """Why transformers' adapter methods refuse to run with the installed peft, or ``None`` when they run.

    The reason is one line naming both installed versions, the floor transformers asks for and what to
    install. It runs the very gate transformers runs, against the floor transformers reads at call time.
    """
    import transformers.integrations.peft as tf_peft
    from transformers.utils.peft_utils import check_peft_version

    floor = getattr(tf_peft, "MIN_PEFT_VERSION", None)
    if floor is None:
        return None
    try:
        check_peft_version(min_version=floor)
    except ValueError:
        try:
            installed = f"peft {version('peft')}"
        except PackageNotFoundError:
            installed = "no peft installed"
        tf = version("transformers")
        return (f"transformers {tf} refuses its adapter methods (set_adapter, disable_adapters, ...) "
                f"with {installed}: it asks for peft >= {floor}. Install peft>={floor} once released, "
                f"or 'transformers<{tf}' (constraints.txt has a tested set); using PEFT's PeftModel API instead.")
    return None
