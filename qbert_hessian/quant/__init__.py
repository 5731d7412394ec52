"""Group-wise quantization: rounding and grouping (functional), fake-quant modules, and plans applied to models."""
