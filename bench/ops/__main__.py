"""``python -m bench.ops`` (the same as ``python -m bench ops``)."""
from .cli import main

main()
