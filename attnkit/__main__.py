"""``python -m attnkit`` (and ``torchrun -m attnkit serve ...``): the command line."""

from .cli import main

raise SystemExit(main())
