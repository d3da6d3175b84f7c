"""``python -m lora_retriever.service``: the ``lora-retriever-serve`` command."""

import sys

from lora_retriever.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
