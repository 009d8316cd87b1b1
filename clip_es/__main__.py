"""``python -m clip_es`` runs the CLI (also how ``torchrun -m clip_es`` launches stages)."""

from clip_es.cli import main

main()
