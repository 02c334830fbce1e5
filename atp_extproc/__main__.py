import sys

from atp_extproc.cli import main

sys.exit(main())
