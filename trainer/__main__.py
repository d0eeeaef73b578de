import sys

from tunerun.trainer.entrypoint import main

sys.exit(main())
