"""`python -m gitlora.trainer --spec SPEC.json`: one training round (see round.py, which reads top to bottom)."""
import sys

from gitlora.trainer.round import main

sys.exit(main())
