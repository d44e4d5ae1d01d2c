"""Writing the pictures: PNG names checked before any work, figures saved at one resolution."""

import os

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402

from gptcraft.config import ConfigError  # noqa: E402
from gptcraft.errors import GptcraftError  # noqa: E402
from gptcraft.files import write_atomic  # noqa: E402

DPI = 100  # a figure of w x h inches is a PNG of 100w x 100h pixels


class PictureError(GptcraftError):
    """A picture could not be written."""


def check_png_name(path):
    """The output key is empty (the default place) or names a PNG file; ConfigError otherwise."""
    if path and not path.lower().endswith(".png"):
        raise ConfigError(f"output is a PNG image: give a name ending in .png, not {path!r}")


def output_path(output, name, run_dir=None):
    """output if given; else name inside run_dir, so that a run's pictures sit with it, or in the current folder."""
    return output or os.path.join(run_dir or "", name)


def save(fig, path):
    """Write fig to path (atomically: a link there is replaced, never written through) and free
    it; an unwritable path is a PictureError."""
    try:
        write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=DPI))
    except OSError as e:
        raise PictureError(f"cannot write {path}: {e.strerror or e}") from None
    finally:
        plt.close(fig)
