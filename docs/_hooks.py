"""MkDocs hook: offline link targets for the Equinox names the Equinox layers' docstrings
cross-reference, so ``mkdocs build --strict`` needs no network to fetch inventories."""

from __future__ import annotations

from typing import Any

_EQUINOX = "https://docs.kidger.site/equinox/api/nn"
EXTERNAL = {
    "equinox.nn.MultiheadAttention": f"{_EQUINOX}/attention/#equinox.nn.MultiheadAttention",
    "equinox.nn.inference_mode": f"{_EQUINOX}/inference/#equinox.nn.inference_mode",
    "equinox.nn.Dropout.__call__": f"{_EQUINOX}/dropout/#equinox.nn.Dropout.__call__",
}


def on_files(files: Any, *, config: Any) -> Any:
    autorefs = config.plugins["autorefs"]
    for identifier, url in EXTERNAL.items():
        autorefs.register_url(identifier, url)
    return files
