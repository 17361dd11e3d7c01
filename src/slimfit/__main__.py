import sys

from slimfit.cli.main import main

sys.exit(main())
