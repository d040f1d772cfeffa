"""`python -m peftctl` is the console script (torchrun and the GPU machine start it this way)."""

from peftctl.cli.app import main

if __name__ == "__main__":
    main()
