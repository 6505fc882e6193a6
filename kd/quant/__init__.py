"""Post-training weight quantization of kd Decoders: RTN, GPTQ, mixed precision, compact export.

  qcfg = QuantConfig(target=r'layers_\\d+/.*_proj', bits=4, group_size=32)
  qparams = quantize_params(variables, qcfg)                     # RTN (kd.quant.rtn)
  qparams = gptq.quantize_model(Decoder(cfg), variables, batches, qcfg)   # GPTQ
  save('m.safetensors', qparams); variables = dequantize(load('m.safetensors'))
"""

from kd.quant import gptq, qat, runtime, sensitivity
from kd.quant.export import load, pack_int4, save, size_on_disk, unpack_int4
from kd.quant.gptq import gptq_kernel, quantize_model
from kd.quant.qat import fake_quant
from kd.quant.rtn import (QuantConfig, QuantizedKernel, QuantizedParams, dequantize,
                          dequantize_kernel, embedding_paths, quantize_embedding,
                          quantize_kernel, quantize_params, target_paths)
from kd.quant.runtime import ptq_model, ptq_variables
from kd.quant.sensitivity import choose_bits, layer_sensitivity

__all__ = ['QuantConfig', 'QuantizedKernel', 'QuantizedParams', 'choose_bits', 'dequantize',
           'dequantize_kernel', 'embedding_paths', 'fake_quant', 'gptq', 'gptq_kernel',
           'layer_sensitivity', 'load', 'pack_int4', 'ptq_model', 'ptq_variables', 'qat',
           'quantize_embedding', 'quantize_kernel', 'quantize_model', 'quantize_params',
           'runtime', 'save', 'sensitivity', 'size_on_disk', 'target_paths', 'unpack_int4']
