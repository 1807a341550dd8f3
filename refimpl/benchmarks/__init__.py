"""One module per chapter benchmark; run them with ``python -m refimpl.bench CHAPTER``."""
