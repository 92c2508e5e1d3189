"""``python -m fip_fast.cli …`` (also what ``torchrun -m fip_fast.cli purify --distributed ddp`` runs)."""
import sys

from fip_fast.cli import main

sys.exit(main())
