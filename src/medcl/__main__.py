import sys

from medcl.cli import main

sys.exit(main())
