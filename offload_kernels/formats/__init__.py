from .qtypes import QTYPES
QuantizedTensor = dequantize = quantize = None
