"""The P×T controller: pressure and geological temperature fields over [layers, experts].

Pure PyTorch; nothing here imports transformers.
"""

from chronovisor.controllers.config import DYNAMICS, MODES, USAGE_KINDS, PTConfig
from chronovisor.controllers.controller import PTController

__all__ = ["DYNAMICS", "MODES", "USAGE_KINDS", "PTConfig", "PTController"]
