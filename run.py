"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (Hydra). Wiring only: see vittm/train.py."""

import sys

import hydra
from omegaconf import DictConfig


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Imported here so that `--help` and `--cfg job` answer without loading torch.
    from vittm.train import main as run
    from vittm.validate import ConfigError

    try:
        return run(cfg)
    except ConfigError as err:  # a setting that cannot work: one line per problem, no traceback, nothing trained
        print(f"error: {err}".replace("\n", "\nerror: "), file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
