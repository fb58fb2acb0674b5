"""`python -m imgcls.models`: the model names a recipe accepts (the same as `imgcls-models`)."""
from imgcls.models.registry import main

if __name__ == "__main__":
    raise SystemExit(main())
