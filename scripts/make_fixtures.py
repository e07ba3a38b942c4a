"""Make the torchvision parity fixtures (run in the dev environment that has torchvision).

    python scripts/make_fixtures.py [family ...]     # families: classification, ...

Models are filled with ``tests/param_fill.py`` (a function of key name and shape), run on
deterministic inputs, and only key/shape lists and outputs are written under
``tests/fixtures/<family>/``. No weight file is stored. Each family lives in
``scripts/fixtures_<family>.py`` and exposes ``make(out_dir: pathlib.Path) -> None``.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "scripts"))

FAMILIES = ["classification", "detection", "segmentation", "quantization"]


def write_keys(path: Path, state_dict) -> None:
    """Key -> shape list, in state_dict order, as JSON."""
    path.write_text(json.dumps([[k, list(v.shape)] for k, v in state_dict.items()], indent=0) + "\n")


def main(argv: list[str]) -> int:
    import torch

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    wanted = argv or FAMILIES
    for family in wanted:
        module_name = f"fixtures_{family}"
        if not (ROOT / "scripts" / f"{module_name}.py").exists():
            print(f"skip {family}: scripts/{module_name}.py does not exist")
            continue
        out = ROOT / "tests" / "fixtures" / family
        out.mkdir(parents=True, exist_ok=True)
        print(f"== {family} -> {out.relative_to(ROOT)}")
        importlib.import_module(module_name).make(out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
