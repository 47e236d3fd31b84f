"""lightning-alphaedit: AlphaEdit knowledge editing as a PyTorch Lightning framework.

    from lightning_alphaedit import edit      # see lightning_alphaedit.api
"""

__version__ = "0.1.0"


def __getattr__(name: str):
    # ``edit`` pulls in Lightning and transformers: imported when asked for, not with the package
    if name == "edit":
        from lightning_alphaedit.api import edit

        return edit
    raise AttributeError(f"module 'lightning_alphaedit' has no attribute {name!r}")
