"""``python -m avar_ray ...`` is the same as ``avar ...`` (handy for ``ray job submit``)."""
import sys

from avar_ray.cli import main

sys.exit(main())
