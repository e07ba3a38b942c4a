"""Write the 1000 ImageNet-1k class names (index order) to mnv3/data/imagenet1k_categories.txt.

Run once in the dev environment that has torchvision (see DEVELOPERS.md); the package
itself never imports torchvision. The names are dataset label facts taken from the
metadata of the official classification weights, so the label ids of our models line up
with those of the torchvision checkpoints.

    <dev-python> scripts/make_imagenet_categories.py [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "mnv3" / "data" / "imagenet1k_categories.txt"


def imagenet_names() -> list[str]:
    """Class names, in label-id order, from the official MobileNetV3 weight metadata."""
    from torchvision.models import MobileNet_V3_Large_Weights

    names = list(MobileNet_V3_Large_Weights.IMAGENET1K_V1.meta["categories"])
    if len(names) != 1000 or len(set(names)) != 1000:
        raise SystemExit(f"expected 1000 distinct ImageNet names, got {len(names)} "
                         f"({len(set(names))} distinct)")
    bad = [n for n in names if "\n" in n or n != n.strip()]
    if bad:
        raise SystemExit(f"names that would not survive one-per-line storage: {bad[:5]}")
    return names


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output text file (one name per line)")
    args = parser.parse_args()
    names = imagenet_names()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(names) + "\n", encoding="utf-8")
    print(f"wrote {len(names)} names to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
