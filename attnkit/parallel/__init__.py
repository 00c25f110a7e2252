"""Beyond one process: tensor parallelism (:mod:`.tensor`: Megatron-LM's split of each layer; :mod:`.engine`: the
engine's steps broadcast from rank 0; :mod:`.launch`: ranks under torchrun or spawned here)."""
