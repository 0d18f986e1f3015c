"""Quantization: which scheme (config.py), how a float weight becomes its quantized
parts (weights.py), and activation statistics on sample inputs (calibration.py). The
passes that rewrite graphs with them are passes/quantize.py and passes/fold_qgemm.py;
the formats and ops they produce are ir/quant_ops.py."""
from .config import SCHEMES, QuantizeConfig, quantize_config

__all__ = ["QuantizeConfig", "SCHEMES", "quantize_config"]
