"""Triton kernels. Imported lazily (only when the triton backend is chosen), so vosops never needs triton.

Each op is a `torch.library.custom_op` (vosops::<op>_triton) with a fake kernel and autograd, so it passes
`torch.library.opcheck` on CPU under TRITON_INTERPRET=1 and traces under torch.compile.
"""
