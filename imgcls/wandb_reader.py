"""`python -m imgcls.wandb_reader`, kept for the documented command; the reader is `imgcls.tracking.wandb_reader`."""
import sys

from imgcls.tracking.wandb_reader import main

if __name__ == "__main__":
    sys.exit(main())
