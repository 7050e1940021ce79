import sys

from shmreg.cli import main

sys.exit(main())
