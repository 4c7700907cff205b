"""The explorer's one door to a run directory.

Everything the explorer needs from `drgn train` / `drgn analyze` outputs (latents and their table rows,
held-out rows, the run's recorded inputs, decoding maps, the device) is imported here and nowhere else in
drgn_core.explore: the run-directory helpers live in `drgn_core.rundir`, the analysis maths in
`drgn_core.analysis`.
"""

from __future__ import annotations

from drgn_core.analysis import fit_pca, kmeans, nearest_rows
from drgn_core.rundir import RunLatents, held_out_mask, load_run, read_npy, resolve_device, run_model
from drgn_core.rundir import decode_volumes as decode_maps
from drgn_core.train import read_run_config

__all__ = [
    "RunLatents",
    "decode_maps",
    "fast_decode_available",
    "fit_pca",
    "held_out_mask",
    "kmeans",
    "load_run",
    "model_box",
    "nearest_rows",
    "read_npy",
    "read_run_config",
    "resolve_device",
]


def fast_decode_available(device: str) -> bool:
    """Whether bf16 autocast speeds decoding here: any GPU, or a CPU with native bfloat16."""
    from drgn_core.train import cpu_has_native_bf16

    return str(device).startswith("cuda") or (str(device) == "cpu" and cpu_has_native_bf16())


def model_box(run_dir) -> int:
    """The training box D of the run's model (maps decode at this size unless told otherwise)."""
    return int(run_model(run_dir, device="cpu")[1].D)
