"""Weight quantization: pure tensor functions (RTN integers, OCP MX and NVFP4 formats, GPTQ, bit accounts).

Every quantizer maps a weight ``W: [out, in]`` to codes on a grid shared by groups of consecutive
inputs of each row, and back to dequantized values ("fake quantization"). :mod:`.scheme` names the
schemes and dispatches; :mod:`.rtn`, :mod:`.mx` and :mod:`.nvfp4` hold the grids; :mod:`.gptq` the
OBS solver (alone, or jointly with SparseGPT's masks); :mod:`.bits` what storing the result costs.
"""
