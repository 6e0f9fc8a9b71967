"""Read single tensors of a safetensors checkpoint lazily (one file or a sharded index), so a
plugin can compare a loaded model's layers with the full-precision weights one layer at a time
without holding the whole checkpoint in memory a second time (LoRA's ``init: loftq``)."""

from __future__ import annotations

import json
from pathlib import Path

from .errors import QpeftError


class CheckpointWeights:
    """The tensors of the safetensors checkpoint in ``folder``, read one by one on request."""

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if index.is_file():
            weight_map = json.loads(index.read_text()).get("weight_map") or {}
            self.files = {name: self.folder / file for name, file in weight_map.items()}
        elif single.is_file():
            from safetensors import safe_open

            with safe_open(str(single), framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), single)
        else:
            raise QpeftError(f"{self.folder} holds no safetensors checkpoint (model.safetensors or its sharded index)")

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def get(self, name: str):
        """The tensor ``name`` as stored (on the CPU), or None when the checkpoint lacks it."""
        file = self.files.get(name)
        if file is None:
            return None
        from safetensors import safe_open

        with safe_open(str(file), framework="pt", device="cpu") as f:
            return f.get_tensor(name)
