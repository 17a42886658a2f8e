"""Layout planning: memory per GPU and step time of every parallel layout (``megaforge plan``).

``gpus.py`` the accelerator table, ``memory.py`` parameters/gradients/optimizer/activations per
rank, ``timing.py`` FLOPs, bubble and communication, ``layouts.py`` the valid layouts and the
search, ``report.py`` the table, ``--explain`` and ``--json``.
"""

from toolkit.planning.gpus import GPU, GPUS, resolve_gpu
from toolkit.planning.layout import Layout
from toolkit.planning.layouts import Estimate, candidate_layouts, estimate, plan
from toolkit.planning.memory import Memory, Shape, memory, total_params
from toolkit.planning.timing import Timing, step_time

__all__ = ["GPUS", "GPU", "resolve_gpu", "Layout", "Estimate", "candidate_layouts", "estimate", "plan", "Memory",
           "Shape", "memory", "total_params", "Timing", "step_time"]
