"""Weight quantization: schemes, RTN, GPTQ, fake-quant for QAT, layer-by-layer calibration, GPTQ checkpoints."""
