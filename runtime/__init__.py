"""Real execution of lina-sim policies on torch.distributed (gloo on CPU, NCCL on GPU)."""
