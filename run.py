"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (Hydra). Wiring only."""

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> None:
    from vittm.summary import summarize  # imported here so `--help`/`--cfg` answer without loading torch

    summarize(cfg)


if __name__ == "__main__":
    main()
