"""kc: knowledge concentration — many specialists distilled into one classifier over a huge label vocabulary."""

__version__ = "0.1.0"


def versions() -> dict[str, str]:
    """kc and the libraries that decide its numbers: recorded in every checkpoint and export, and by `kc --version`."""
    import platform

    import timm
    import torch

    return {
        "kc": __version__,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "python": platform.python_version(),
    }
