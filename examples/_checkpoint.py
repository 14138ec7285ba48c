"""Saving and loading the training state: Orbax for Flax (NNX and Linen), and
``equinox.tree_serialise_leaves`` for Equinox, each framework's own way. The framework
packages are imported only when used, so an Equinox run never pays for importing Orbax."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jax


def path(out: Path, framework: str) -> Path:
    """Where the checkpoint of a run lives inside its output directory."""
    return out / ("checkpoint.eqx" if framework == "equinox" else "checkpoint")


def save(out: Path, framework: str, state: Any) -> Path:
    """Write ``state`` (a pytree of arrays), replacing any earlier checkpoint."""
    target = path(out, framework)
    if framework == "equinox":
        import equinox as eqx

        eqx.tree_serialise_leaves(target, state)
    else:
        import orbax.checkpoint as ocp

        # Orbax wants an absolute path; `force` replaces the previous checkpoint.
        with ocp.StandardCheckpointer() as checkpointer:
            checkpointer.save(target.absolute(), state, force=True)
    return target


def restore(out: Path, framework: str, like: Any) -> Any:
    """Read the checkpoint into the structure, dtypes and shardings of ``like``."""
    target = path(out, framework)
    if not target.exists():
        raise SystemExit(f"--resume: no checkpoint at {target}; run without --resume first.")
    if framework == "equinox":
        import equinox as eqx

        # Leaves are loaded onto the default device; put them back where `like` lives.
        loaded = eqx.tree_deserialise_leaves(target, like)
        return jax.tree.map(lambda new, old: jax.device_put(new, old.sharding), loaded, like)
    import orbax.checkpoint as ocp

    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    with ocp.StandardCheckpointer() as checkpointer:
        return checkpointer.restore(target.absolute(), abstract)
