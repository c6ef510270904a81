"""Public ops: argument checks, backend selection, and the torch.library registrations of the native kernels."""
