"""``python -m editr1 ...``: the same command as ``editr1 ...`` (:func:`editr1.cli.main`)."""

from editr1.cli import main

if __name__ == "__main__":
    main()
