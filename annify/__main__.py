"""``python -m annify`` (what ``torchrun -m annify train ...`` runs)."""

from annify.cli import main

if __name__ == "__main__":
    main()
