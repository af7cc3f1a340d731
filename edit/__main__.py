import sys

from edit.cli import main

sys.exit(main())
