"""`python -m megdet ...` (what torchrun runs on every node)."""

from megdet.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
