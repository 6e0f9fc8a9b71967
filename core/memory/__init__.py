"""Ways to train longer rows or faster within a card's memory, each a trainer option of `native`:
:mod:`.offload` (activation offloading to pinned CPU memory), :mod:`.activations` (the
memory-budget mode: decoder layers that keep their activations instead of recomputing them) and
:mod:`.tiled_mlp` (the MLP run a tile of tokens at a time)."""
