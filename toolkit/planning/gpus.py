"""The accelerators the planner knows: memory, dense peak FLOP/s and interconnect, per GPU.

Figures are vendors' data sheets (dense, no sparsity); bandwidths are per GPU and one direction:
``intra_node_gbps`` over NVLink / Infinity Fabric / PCIe inside a node, ``inter_node_gbps`` the
GPU's share of the node's network (e.g. DGX A100: 8 × 200 Gb/s HDR for 8 GPUs = 25 GB/s each).
Every figure can be overridden on the command line (``--gpu-memory``, ``--gpu-flops``, …).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from toolkit.errors import ConfigError, closest


@dataclass(frozen=True)
class GPU:
    name: str  # table key, e.g. a100-80gb
    memory_gib: float  # device memory in GiB as CUDA reports it (an "80 GB" A100 has 80 GiB)
    bf16_tflops: float  # dense bf16 tensor-core peak, TFLOP/s (0: no bf16, e.g. V100)
    fp16_tflops: float  # dense fp16 tensor-core peak, TFLOP/s
    fp32_tflops: float  # dense fp32 matmul peak (TF32 tensor cores where the GPU has them), TFLOP/s
    intra_node_gbps: float  # per-GPU one-way bandwidth to GPUs in the same node, GB/s
    inter_node_gbps: float  # per-GPU one-way bandwidth to other nodes, GB/s
    gpus_per_node: int  # GPUs sharing the intra-node link (tensor parallelism stays inside one node)

    def peak_flops(self, precision: str) -> float:
        """Dense peak FLOP/s for ``trainer.precision`` (0 when the GPU lacks the format)."""
        return {"fp32": self.fp32_tflops, "fp16": self.fp16_tflops}.get(precision, self.bf16_tflops) * 1e12


GPUS: dict[str, GPU] = {g.name: g for g in (
    # NVIDIA A100 SXM (DGX A100): NVLink 3 600 GB/s both ways, 8 × HDR 200 Gb/s per node
    GPU(name="a100-40gb", memory_gib=40, bf16_tflops=312, fp16_tflops=312, fp32_tflops=156, intra_node_gbps=300,
        inter_node_gbps=25, gpus_per_node=8),
    GPU(name="a100-80gb", memory_gib=80, bf16_tflops=312, fp16_tflops=312, fp32_tflops=156, intra_node_gbps=300,
        inter_node_gbps=25, gpus_per_node=8),
    # NVIDIA H100 SXM (DGX H100): NVLink 4 900 GB/s both ways, 8 × NDR 400 Gb/s per node
    GPU(name="h100", memory_gib=80, bf16_tflops=989, fp16_tflops=989, fp32_tflops=494, intra_node_gbps=450,
        inter_node_gbps=50, gpus_per_node=8),
    # NVIDIA H100 PCIe: PCIe Gen5 x16 (64 GB/s) between GPUs, 200 Gb/s per GPU across nodes
    GPU(name="h100-pcie", memory_gib=80, bf16_tflops=756, fp16_tflops=756, fp32_tflops=378, intra_node_gbps=64,
        inter_node_gbps=25, gpus_per_node=8),
    # NVIDIA H200 SXM: H100's compute with 141 GB HBM3e
    GPU(name="h200", memory_gib=140, bf16_tflops=989, fp16_tflops=989, fp32_tflops=494, intra_node_gbps=450,
        inter_node_gbps=50, gpus_per_node=8),
    # NVIDIA L40S: PCIe Gen4 only (no NVLink), typically 100 Gb/s Ethernet per GPU
    GPU(name="l40s", memory_gib=45, bf16_tflops=362, fp16_tflops=362, fp32_tflops=91.6, intra_node_gbps=32,
        inter_node_gbps=12.5, gpus_per_node=8),
    # NVIDIA A10G (AWS g5): PCIe Gen4, 8 per g5.48xlarge, 100 Gb/s per node
    GPU(name="a10g", memory_gib=22.5, bf16_tflops=70, fp16_tflops=70, fp32_tflops=35, intra_node_gbps=32,
        inter_node_gbps=1.56, gpus_per_node=8),
    # NVIDIA V100 SXM2 32 GB (DGX-1/2): fp16 tensor cores, no bf16; NVLink 2 300 GB/s both ways
    GPU(name="v100", memory_gib=32, bf16_tflops=0, fp16_tflops=125, fp32_tflops=15.7, intra_node_gbps=150,
        inter_node_gbps=12.5, gpus_per_node=8),
    # AMD MI300X: 192 GB HBM3, Infinity Fabric 7 × 64 GB/s, 8 × 400 Gb/s per node
    GPU(name="mi300x", memory_gib=192, bf16_tflops=1307, fp16_tflops=1307, fp32_tflops=163, intra_node_gbps=448,
        inter_node_gbps=50, gpus_per_node=8),
)}

ALIASES = {"a100": "a100-80gb", "h100-sxm": "h100", "h100-80gb": "h100", "h200-sxm": "h200", "a10": "a10g",
           "v100-32gb": "v100"}


def resolve_gpu(name: str | None, **overrides) -> GPU:
    """The table's GPU ``name`` (``None``: a100-80gb) with the non-None ``overrides`` (field → value)
    applied; an unknown name is a one-line :class:`ConfigError` naming the known ones."""
    key = (name or "a100-80gb").lower()
    key = ALIASES.get(key, key)
    if key not in GPUS:
        hint = closest(key, list(GPUS) + list(ALIASES))
        raise ConfigError(f"--gpu {name}: unknown GPU" + (f"; did you mean '{hint}'?" if hint else "")
                          + f" Known: {', '.join(GPUS)}; or give --gpu-memory and --gpu-flops for another")
    gpu = GPUS[key]
    changes = {k: v for k, v in overrides.items() if v is not None}
    for k, v in changes.items():
        if k != "gpus_per_node" and v <= 0 or k == "gpus_per_node" and int(v) < 1:
            raise ConfigError(f"--{k.replace('_', '-').replace('-gb', '')} must be positive, got {v}")
    return dataclasses.replace(gpu, **changes) if changes else gpu
