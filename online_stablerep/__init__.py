"""online_stablerep: StableRep trained on Stable Diffusion images generated inside the job."""

__version__ = "0.1.0"
