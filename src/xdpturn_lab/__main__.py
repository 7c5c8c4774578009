import sys

from xdpturn_lab.cli import main

sys.exit(main())
