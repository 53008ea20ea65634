"""The Pallas form lives with decode attention (one kernel body, the PaTH key update
switched on by its extra operands): kernels/decode_attention/pallas.py."""

from kernels.decode_attention.pallas import path_decode_attention  # noqa: F401
