"""Block granularity, in three layers: kernel -> op -> layer.

``geometry`` tiles a weight's GEMM view into ``B x B`` blocks (and says which blocks a
mask keeps), ``layout`` indexes the kept blocks the way kernels walk them, ``gemm`` is the
block-sparse GEMM as a PyTorch autograd op (``dsparse.kernels`` holds the Triton kernels
beside it), ``layers`` the ``Linear``/``Conv2d`` that store only the kept blocks and run one
of the two, and ``vote`` the unanimous vote solved exactly to the block.
"""
