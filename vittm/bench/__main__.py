"""``python -m vittm.bench [hydra overrides]``: the model benchmark (vittm.bench.speed, conf/bench.yaml)."""

from vittm.bench.speed import main

main()
