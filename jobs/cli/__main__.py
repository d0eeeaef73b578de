"""`python -m tunerun.jobs.cli …`: the same as the `tunerun` console script."""
from tunerun.jobs.cli import main

if __name__ == "__main__":
    main()
