"""GRPO with key-token reinforcement (Video-KTR).

Not implemented yet: this stage is planned in issue #4. It already takes its config the way
every stage does (`--config FILE key=value ...`), so run.sh and the tests can call it.
"""

import sys
from dataclasses import dataclass

from common.config import parse_config


@dataclass
class Config:
    model: str = "outputs/tiny/sft"
    data: str = "outputs/tiny/data/train.json"
    output_dir: str = "outputs/tiny/train_ktr"
    seed: int = 0


def main() -> None:
    parse_config(Config)
    sys.exit("train_ktr.py: not implemented yet (issue #4)")


if __name__ == "__main__":
    main()
