"""`python -m navil_hf`: the `navil` command line under a name no other package shares."""

from .cli import main

if __name__ == "__main__":
    raise SystemExit(main())
