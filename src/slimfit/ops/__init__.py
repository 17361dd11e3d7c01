"""Memory-lean autograd ops: what backward keeps is a deliberate choice per op.

- :mod:`.config`: ``CompressionConfig`` and its presets (``"default"``, ``"paper"``, ``"none"``).
- :mod:`.quant`: pure-PyTorch quantize/pack, dequantize, top-k and bit masks.
- :mod:`.kernels`: Triton kernels with the same numerics (CUDA, when triton imports).
- :mod:`.linear`, :mod:`.activation`, :mod:`.norm`, :mod:`.attention`, :mod:`.dropout`:
  the autograd functions; :mod:`slimfit.convert` puts them into a model in place.
"""

from .config import CompressionConfig
from .quant import dequantize, quantize, triton_available

__all__ = ["CompressionConfig", "dequantize", "quantize", "triton_available"]
