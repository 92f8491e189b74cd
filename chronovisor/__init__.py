"""Chronovisor: steer the routing of HuggingFace Mixture-of-Experts models with a P×T controller.

``import chronovisor`` imports nothing heavy: ``PTConfig`` and ``PTController`` (torch) and the
transformers-facing parts (``wrap``, ``load``, ``ChronovisorModel``) are imported on first use, so
that ``chronovisor --help`` starts without torch.
"""

__version__ = "0.1.0"

_LAZY = {
    "PTConfig": "chronovisor.controllers",
    "PTController": "chronovisor.controllers",
    "wrap": "chronovisor.model",
    "load": "chronovisor.model",
    "ChronovisorModel": "chronovisor.model",
}

__all__ = ["__version__", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'chronovisor' has no attribute {name!r}")
