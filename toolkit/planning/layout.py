"""One parallel layout: the knobs ``megaforge plan`` searches and ``megaforge train`` takes as overrides."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Layout:
    tp: int  # parallel.tensor_model_parallel_size
    pp: int  # parallel.pipeline_model_parallel_size
    vpp: int  # parallel.virtual_pipeline_model_parallel_size (1: not interleaved)
    dp: int  # data-parallel size = GPUs / (tp × pp)
    sharding: str  # parallel.data_parallel_sharding: none | optimizer_and_grads | full
    sp: bool  # parallel.sequence_parallel
    recompute: str  # model.recompute_granularity: none | selective | full
    micro_batch: int  # trainer.micro_batch_size
    num_microbatches: int  # micro-batches per step per data-parallel rank (global / (micro × dp))

    def overrides(self) -> list[str]:
        """The ``KEY=VALUE`` overrides that give ``megaforge train`` this layout."""
        return [f"parallel.tensor_model_parallel_size={self.tp}",
                f"parallel.pipeline_model_parallel_size={self.pp}",
                f"parallel.virtual_pipeline_model_parallel_size={self.vpp if self.vpp > 1 else 'null'}",
                "parallel.pipeline_schedule=1f1b",  # interleaved when vpp > 1
                f"parallel.sequence_parallel={'true' if self.sp else 'false'}",
                f"parallel.data_parallel_sharding={self.sharding}",
                f"model.recompute_granularity={self.recompute}",
                f"trainer.micro_batch_size={self.micro_batch}"]

    def label(self) -> str:
        """Short name, e.g. ``tp8 pp35 vpp3 dp16``."""
        return f"tp{self.tp} pp{self.pp}" + (f" vpp{self.vpp}" if self.vpp > 1 else "") + f" dp{self.dp}"
