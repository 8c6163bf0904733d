import sys

from altgrad._cli import main

sys.exit(main())
