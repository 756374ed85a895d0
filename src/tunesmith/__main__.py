"""`python -m tunesmith`: the command line, for where the `tunesmith` script is not on PATH (torchrun's workers)."""
from tunesmith.cli import main

main()
