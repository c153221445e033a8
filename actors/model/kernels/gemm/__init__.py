"""Triton GEMMs over dense or block-scaled FP8 weights (actors/model/quant/blocks.py).

    act_quant   activations -> FP8 per token group of 128 columns, with a float32 scale per group
    fp8_gemv    routed experts, few tokens: one program per (token, expert) and tile of output rows
    grouped     the GEMM kernel: sorted (token, expert) assignments over device-side expert offsets,
                or a dense linear; bf16, FP8 weight-only or W8A8; fused SiLU-and-multiply and
                activation quantization in the gate/up epilogue, a scatter to slot order in the down
    moe         routed experts through those kernels, ending in kernels/moe.py's combine
    linear      the dense FP8 linear of the attention projections and shared experts
    configs     the path cut-overs and tile table (measured on the GPU by bench/gemm_autotune.py)

No host synchronisation and launch shapes that follow from the input shapes only, so everything here
runs inside the decode CUDA graphs. Like every kernel package module, the torch code each op replaces
stays beside the call (actors/model/quant/linear.py, actors/model/experts.py) as the fallback.
"""
