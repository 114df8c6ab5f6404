"""Launch: ``deepspeed train.py --config configs/<run>.yaml [--stage 1|2|all] [--section.key=value ...]``.

``python train.py ...`` runs one process without the launcher.
"""

import os
import sys

# Launched from the repository root, the folder ``kernels/`` must not become importable as ``kernels`` (Hugging Face's
# package name): the code runs from the installed ``alignx`` package, whose ops live in ``alignx.kernels``.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]


def main() -> None:
    from alignx.cli import train_main

    sys.exit(train_main(sys.argv[1:]))


if __name__ == "__main__":
    main()
