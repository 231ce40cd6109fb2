"""localora: find how to combine several LoRAs, locally, with a VLM in the loop."""

import logging as _logging
import os as _os

__version__ = "0.1.0"

# bitsandbytes warns at import that it cannot fetch optional CPU kernels from a hub; localora
# never downloads at run time, so that line is noise on every command.
_logging.getLogger("bitsandbytes").setLevel(_logging.ERROR)

# Progress bars of model loading would garble the live view and logs; localora shows its own.
_os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def package_version(package: str) -> str:
    """An installed package's version, or "not installed"."""
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"
