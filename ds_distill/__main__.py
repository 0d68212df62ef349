import sys

from ds_distill.cli import main

sys.exit(main())
