"""Allow ``python -m e2edet``."""

from e2edet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
