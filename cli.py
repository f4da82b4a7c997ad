"""`python cli.py ARGS` behaves exactly like the `fintensor` console script."""
from fintensor.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
