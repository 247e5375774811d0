"""Weight quantization: schemes, RTN, GPTQ, fake-quant for QAT, layer-by-layer calibration, GPTQ checkpoints."""

from .qat import FakeQuantLinear, convert_qat, prepare_qat

__all__ = ["FakeQuantLinear", "convert_qat", "prepare_qat"]
