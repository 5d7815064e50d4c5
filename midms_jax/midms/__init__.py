"""The method: ``model.MIDMs`` composes the Flax models (``midms_jax.models``) with the diffusion
schedules into the matching stage, the interleaved loop and the entry points (``translate``,
``train_forward``); ``matching`` holds the correspondence operations (correlation, soft warps,
flows, the cycle-consistency mask)."""
