"""MIDMs training losses: VGG19 features, the official contextual loss, and every loss term."""
