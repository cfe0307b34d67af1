import sys

from basin.cli import main

sys.exit(main())
