"""slimfit: fine-tune transformers on small GPUs by dynamic layer freezing (ILS) and
activation compression (SlimFit, arXiv 2305.18513).

One line in any training loop::

    sf = slimfit.attach(model, optimizer, slimfit.SlimFitConfig(freeze_ratio=0.9, seed=0))
"""

from .attach import SlimFit, attach
from .config import SlimFitConfig
from .convert import convert, restore
from .ops.config import CompressionConfig

__version__ = "0.1.0"
__all__ = [
    "CompressionConfig",
    "SlimFit",
    "SlimFitConfig",
    "attach",
    "convert",
    "restore",
    "__version__",
]
