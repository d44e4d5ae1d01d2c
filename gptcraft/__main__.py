"""python -m gptcraft: the same as the `gptcraft` command."""

import sys

from gptcraft.cli import main

sys.exit(main())
