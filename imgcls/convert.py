"""`python -m imgcls.convert`: kept for the documented command; the converter lives in `imgcls.models.convert`."""
import sys

from imgcls.models.convert import main

if __name__ == "__main__":
    sys.exit(main())
