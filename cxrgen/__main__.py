"""`python -m cxrgen`: the same command line as the `cxrgen` script."""
from cxrgen.cli import main

if __name__ == "__main__":
    main()
