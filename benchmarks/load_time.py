"""Wall time of loading the embedded default model: first load (GGUF conversion unless cached) and a second load.

    python benchmarks/load_time.py --out docs/results/load_time_cpu.json
"""

from __future__ import annotations

import argparse
import json
import time
from datetime import date
from pathlib import Path

from drrl_gym.backbone import DEFAULT_MODEL, load_backbone
from drrl_gym.perplexity import describe_machine


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    seconds = []
    for _ in range(2):
        start = time.perf_counter()
        load_backbone(DEFAULT_MODEL, device=args.device)
        seconds.append(time.perf_counter() - start)
    result = dict(first_load_s=seconds[0], second_load_s=seconds[1], machine=describe_machine(), date=date.today().isoformat())
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(result)


if __name__ == "__main__":
    main()
