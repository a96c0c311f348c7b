"""One module per ``eetb`` verb, each with ``main(argv) -> int``."""
