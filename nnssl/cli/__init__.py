"""Thin console entry points: parse arguments, call one library function, report NnsslError without a traceback."""
import logging


def setup_logging() -> None:
    """nnssl's own progress messages at INFO; other libraries (numexpr, blosc2, ...) only from WARNING up."""
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("nnssl").setLevel(logging.INFO)
