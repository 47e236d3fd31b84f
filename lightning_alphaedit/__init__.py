"""lightning-alphaedit: AlphaEdit knowledge editing as a PyTorch Lightning framework."""

__version__ = "0.1.0"
