"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (Hydra). Wiring only: see vittm/train.py."""

import sys

import hydra
from omegaconf import DictConfig

# Importing vittm.sweep registers the resolvers the config uses (job folder names, SQLite URLs) before Hydra composes
# it; it imports the vittm package, and with it torch, so nothing is gained by importing the rest lazily.
from vittm.sweep import failed_job_value, in_multirun, record_failure
from vittm.train import main as run
from vittm.validate import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        return run(cfg)
    except Exception as err:  # noqa: BLE001
        if in_multirun():  # one bad combination or crash must not end the sweep: record it, let the others run
            record_failure(cfg.output_dir, err)
            return failed_job_value(err)
        if isinstance(err, ConfigError):  # a setting that cannot work: one line per problem, no traceback
            print(f"error: {err}".replace("\n", "\nerror: "), file=sys.stderr)
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
