"""`python -m ctrflow` is the `ctrflow` command."""
import sys

from ctrflow.cli import main

sys.exit(main())
