"""Parallel training core: device mesh, validation, tensor/sequence, data and pipeline parallelism.

Everything here is built on PyTorch-native pieces (DeviceMesh, DTensor tensor parallelism, FSDP2,
``torch.distributed.pipelining``, DCP) with Megatron's knob names. Meshes and process groups are
passed explicitly; this package holds no global mutable state.
"""

from toolkit.parallel.mesh import ParallelDims, dist_env
from toolkit.parallel.validate import validate_parallel

__all__ = ["ParallelDims", "dist_env", "validate_parallel"]
