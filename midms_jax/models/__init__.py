"""Flax (linen) modules of MIDMs: first-stage autoencoders, the LDM U-Net, correspondence
networks."""
