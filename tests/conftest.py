import torch

torch.set_default_dtype(torch.float64)  # exact-value tests compare to 1e-10 and better
