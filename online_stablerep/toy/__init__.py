"""The toy text-to-image model of the procedural world: its captions, components and training."""
