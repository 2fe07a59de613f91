"""lina-sim: a discrete-event simulator of GPU clusters for MoE communication
scheduling and expert placement, plus a torch.distributed runtime sharing its policies."""

__version__ = "0.1.0"
