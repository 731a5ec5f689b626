"""``python -m shieldbench``: the CLI, also what ``torchrun -m shieldbench run ...`` starts on each rank."""

from shieldbench.cli import main

if __name__ == "__main__":
    main()
