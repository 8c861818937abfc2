"""dmax_ext: DMax soft parallel decoding and on-policy uniform training for LLaDA2-MoE dLLMs."""
from ._native import build_summary, built_with_cuda, load_ops

load_ops()

from . import ops, reference  # noqa: E402

__version__ = "0.1.0"


def __getattr__(name):
    # The model, decoder and trainer import lazily so `import dmax_ext` stays cheap for users
    # who only want the ops.
    if name in ("load_model", "save_model", "random_model"):
        from . import model
        return getattr(model, name)
    if name == "decode":
        from .decoding import decode
        return decode
    raise AttributeError(f"module 'dmax_ext' has no attribute {name!r}")


__all__ = ["ops", "reference", "load_model", "save_model", "random_model", "decode",
           "build_summary", "built_with_cuda", "__version__"]
