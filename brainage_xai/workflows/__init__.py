"""The two levels wired from the library packages: :mod:`.participant` and :mod:`.group`."""
