"""Entry point: ``python run.py [group=option ...] [key=value ...]`` (Hydra). Wiring only: see vittm/tasks/run.py.

Until Hydra has parsed the command line only Hydra, OmegaConf and cli.py (torch-free; its docstring says why it
sits outside the package) are imported: ``--help``, ``--cfg job`` and a mistyped override take well under 2 s. The
training code (torch, timm, Lightning: ~8 s to import) is imported inside the task function.
"""

import sys

import hydra
from omegaconf import DictConfig

import cli  # registers the config's resolvers (job folder names, SQLite URLs, wandb groups)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    from vittm.studies.sweep import failed_job_value, in_multirun, record_failure
    from vittm.tasks.run import main as run
    from vittm.training.validate import ConfigError

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
    cli.answer_help(sys.argv[1:])  # --help without Hydra's slow listing of the groups (cli.py says why)
    cli.refuse_bad_overrides(sys.argv[1:])  # one `error:` line and exit 2 for an override that cannot work
    main()
