"""The EPTQ method: label-free activation Hessian, weight Hessian, block-wise reconstruction, checkpoints."""
