import sys

from sgtarget.cli.main import main

sys.exit(main())
