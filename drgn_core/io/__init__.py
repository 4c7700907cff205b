"""File formats: the canonical particle table, MRC stacks, users' RELION STAR and cryoSPARC .cs files,
stack lists, original-image reading and our own downsampled stacks.

Every public name is re-exported here (``from drgn_core.io import read_table, read_images``), lazily:
importing a light submodule such as ``drgn_core.io.atomic`` must not pull in pandas, scipy and mrcfile,
so the names resolve on first use (PEP 562 module ``__getattr__``).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "cs": ["read_cs", "write_cs", "load_dataset"],
    "images": ["ImageSource", "iter_image_chunks", "read_images"],
    "mrc": ["new_mmap_stack", "read_mrc", "read_stack_header", "write_mrc"],
    "stack": ["ParticleStack", "open_stack", "sidecar_path"],
    "stacklist": ["StackList", "read_stacklist"],
    "star": ["read_relion_star", "write_relion_star"],
    "star_format": ["read_star_blocks", "write_star"],
    "table": ["ParticleTable", "read_table", "write_table"],
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'drgn_core.io' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"drgn_core.io.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
