"""edgetune: keep a pretrained model learning on the device it is deployed to."""
from edgetune.version import __version__

__all__ = ["__version__"]
