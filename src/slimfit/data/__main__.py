"""``python -m slimfit.data --write-npz FOLDER``: check the Fashion-MNIST files, or write the
compact .npz to carry to a machine without apt (see :mod:`slimfit.data.vision`)."""

from .vision import main

if __name__ == "__main__":
    main(prog="python -m slimfit.data")
