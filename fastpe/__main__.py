import sys

from fastpe.cli import main

if __name__ == "__main__":  # not when a spawned worker process (fastpe study --jobs) re-imports this module
    sys.exit(main())
