"""Triton kernels, one module per fused operation; nothing here knows about nn.Modules.

On a machine without CUDA, ``PEFT_FAST_BACKEND=triton`` runs the kernels under the Triton
interpreter; the variable must reach Triton before any kernel is defined, hence here.
"""

import os

if os.environ.get("PEFT_FAST_BACKEND") == "triton" and not os.environ.get("TRITON_INTERPRET"):
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"
