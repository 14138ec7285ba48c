"""Which contenders exist on this machine, and what Flax and Equinox actually offer."""

from __future__ import annotations

import importlib

import jax

import stablelayers as sl
from benchmarks.config import OPS
from benchmarks.contender import Contender
from benchmarks.jax_contender import JaxContender
from benchmarks.torch_contender import TorchContender, torch_available

# Framework namespaces that might carry their own version of an op. Each is checked at run
# time: an op that is the very same object as jax.nn's is not timed twice under a new name.
_FRAMEWORK_MODULES = ("flax.linen", "flax.nnx", "equinox.nn")


def stablelayers_contender(ops: tuple[str, ...] = OPS) -> JaxContender:
    """stablelayers' public functions (softplus with the Python-number beta of 1.0)."""
    functions = {"softmax": sl.softmax, "log_softmax": sl.log_softmax, "softplus": sl.softplus}
    return JaxContender("stablelayers", {op: functions[op] for op in ops})


def jax_nn_contender(name: str = "jax.nn", ops: tuple[str, ...] = OPS) -> JaxContender:
    """jax.nn's functions, under whatever jax config this process has."""
    return JaxContender(name, {op: getattr(jax.nn, op) for op in ops})


def framework_contenders() -> tuple[list[Contender], list[str]]:
    """Flax/Equinox contenders for ops they implement themselves, and a note per namespace
    saying what it has: its own op, a re-export of jax.nn's, or nothing."""
    contenders: list[Contender] = []
    notes: list[str] = []
    for module_name in _FRAMEWORK_MODULES:
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            notes.append(f"`{module_name}`: not installed.")
            continue
        own = {}
        same, missing = [], []
        for op in OPS:
            fn = getattr(module, op, None)
            if fn is None:
                missing.append(op)
            elif fn is getattr(jax.nn, op):
                same.append(op)
            else:
                own[op] = fn
        parts = []
        if same:
            parts.append(f"{', '.join(same)} are jax.nn's own objects (re-exported)")
        if missing:
            parts.append(f"no {', '.join(missing)}")
        if own:
            parts.append(f"its own {', '.join(own)} (measured as `{module_name}`)")
            contenders.append(JaxContender(module_name, own))
        notes.append(f"`{module_name}`: {'; '.join(parts)}.")
    return contenders, notes


def main_contenders() -> tuple[list[Contender], list[str], list[str]]:
    """Everything measured in the main process, notes on what was left out and why, and
    what Flax and Equinox offer."""
    frameworks, framework_notes = framework_contenders()
    contenders: list[Contender] = [stablelayers_contender(), jax_nn_contender(), *frameworks]
    notes = []
    if torch_available():
        contenders.append(TorchContender())
    else:
        notes.append("PyTorch: not installed (`pip install torch`), so no torch rows.")
    return contenders, notes, framework_notes
