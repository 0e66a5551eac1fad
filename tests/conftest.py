import os

import torch

# Triton reads this once, at import: without a GPU its kernels can only run interpreted.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
