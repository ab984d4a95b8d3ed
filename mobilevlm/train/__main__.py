"""`python -m mobilevlm.train <original train.py flags>`: what torchrun / accelerate launch / deepspeed run."""
import sys

from mobilevlm.errors import MobileVLMError
from mobilevlm.train.train import main

if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except MobileVLMError as err:
        print(f"mobilevlm train: error: {err}", file=sys.stderr)
        sys.exit(1)
