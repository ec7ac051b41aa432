"""What ``python run.py`` does before Hydra parses its command line, importing only Hydra and OmegaConf.

Why a module outside the ``vittm`` package: ``import vittm`` registers the vittm_* models with timm (a contract of
the package), so importing anything under ``vittm/`` first imports torch, timm and Lightning (~8 s). Living beside
run.py, this module lets ``--help``, ``--cfg job`` and a mistyped override be answered at once; run.py imports the
training code inside its task function. It does two things:

- registers the OmegaConf resolvers the config uses (``job_dirname``, ``sqlite_url``, ``run_group``). Their code
  stays in vittm/studies/sweep.py and is imported when Hydra first resolves one: when it names a multirun job's folder
  or opens an Optuna study, or when a logger is built, i.e. when training, and torch, follow anyway;
- checks the command-line overrides against the composed config before Hydra runs (``refuse_bad_overrides``): an
  unknown key, a group option that does not exist or a bad override is refused with one ``error:`` line naming it,
  with a did-you-mean from the real keys and options, exit status 2. Everything valid is left to Hydra as it is.
"""

from __future__ import annotations

import contextlib
import difflib
import io
import re
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parent / "conf"
RESOLVERS = ("job_dirname", "sqlite_url", "run_group")
GRAMMAR = "https://hydra.cc/docs/advanced/override_grammar/basic/"
_MISSING = object()


def _from_sweep_module(name: str) -> Callable[..., Any]:
    def resolve(*args: Any) -> Any:
        from vittm.studies import sweep  # imports torch: only once Hydra resolves the interpolation

        return getattr(sweep, name)(*args)

    return resolve


def register_resolvers() -> None:
    for name in RESOLVERS:  # vittm.studies.sweep registers the same names when imported first (tests, notebooks)
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, _from_sweep_module(name))


register_resolvers()


def answer_help(argv: list[str]) -> None:
    """``python run.py [overrides] --help``: the config groups and the composed config, then exit 0.

    Written here because Hydra's own app help re-reads the whole config repository once per group to list their
    options (136 deep copies, ~1.4 s of CPU: over 2 s on this shared machine); the groups are the folders of conf/,
    their options its yaml files, so listing them takes milliseconds. ``--hydra-help`` is still Hydra's.
    """
    if not ({"--help", "-h"} & set(argv)) or "--hydra-help" in argv:
        return
    from hydra import compose, initialize_config_dir

    overrides = [a for a in argv if a not in ("--help", "-h") and not a.startswith("-")]
    if override_problem(overrides):  # a bad override: said as for any other command
        refuse_bad_overrides(overrides)
    groups = {d.name: sorted(f.stem for f in d.glob("*.yaml")) for d in sorted(CONF.iterdir())
              if d.is_dir() and d.name != "hydra"}
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="run"):
        cfg = compose(config_name="config", overrides=overrides)
    print("python run.py [group=option ...] [key=value ...]   (-m: one job per value; --hydra-help: Hydra's flags)\n")
    print("== Configuration groups ==\nCompose your configuration from those groups (group=option)\n")
    print("\n".join(f"{name}: {', '.join(options)}" for name, options in groups.items() if options))
    print("\n== Config ==\nOverride anything in the config (foo.bar=value)\n")
    print(OmegaConf.to_yaml(cfg))
    sys.exit(0)


def refuse_bad_overrides(argv: list[str]) -> None:
    """Exit with status 2 and one ``error:`` line when an override of ``argv`` cannot work."""
    problem = override_problem(argv)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        sys.exit(2)


def override_problem(argv: list[str]) -> str | None:
    """The first problem with the overrides of a ``run.py`` command line, or None (also when Hydra's own flags say
    the config comes from elsewhere: Hydra then checks it itself)."""
    from hydra._internal.utils import get_args_parser  # the parser hydra.main uses, so flags mean the same here

    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            args = get_args_parser().parse_args(argv)
    except SystemExit:  # --version, or a flag Hydra refuses: Hydra answers it the same way
        return None
    elsewhere = args.config_path or args.config_name or args.config_dir or args.experimental_rerun
    if not args.overrides or elsewhere or args.shell_completion:
        return None
    multirun = args.multirun or "hydra.mode=MULTIRUN" in args.overrides
    return _check(args.overrides, multirun)


class Refused(Exception):
    """An override that cannot work; the message names it."""


def _check(overrides: list[str], multirun: bool) -> str | None:
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3", job_name="run"):
        try:
            _Overrides(GlobalHydra.instance().config_loader(), overrides, multirun).check()
        except Refused as problem:
            return str(problem)
    return None


class _Overrides:
    """One command line's overrides, composed as Hydra will compose them. A multirun is checked as its first job:
    each sweep replaced by its first value (every value of a group sweep must be an option), a preset's sweeper
    params (``sweep=rw_heads``) joining in before the command line. An interval sweep (Optuna) cannot be
    enumerated: only its key must exist."""

    def __init__(self, loader: Any, overrides: list[str], multirun: bool) -> None:
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import OverrideParseException

        self.parser = OverridesParser.create(config_loader=loader)
        try:
            self.parsed = self.parser.parse_overrides(overrides)
        except OverrideParseException as err:
            raise Refused(_syntax_problem(err.override, err.message)) from None
        self.groups = {g: loader.get_group_options(g) for g in _groups(loader, "")}
        self.unenumerable: list[Any] = []
        concrete = [(i, self._concrete(o, multirun)) for i, o in enumerate(self.parsed)]
        self.lines = {i: line for i, line in concrete if line is not None}  # index in parsed -> the line composed
        self.preset = self._sweeper_params() if multirun else []

    def _concrete(self, o: Any, multirun: bool) -> str | None:
        if o.key_or_group in self.groups and not o.is_delete() and o.value() is None:
            raise Refused(f"{o.input_line}: a group takes an option; to select none: ~{o.key_or_group}")
        if not o.is_sweep_override():
            return o.input_line
        if not multirun:
            raise Refused(f"{o.input_line}: several values need a multirun: python run.py -m {o.input_line} (for a "
                          f"list: {o.get_key_element()}=[...]; for a string with commas, quote it)")
        if o.is_hydra_override():
            raise Refused(f"{o.input_line}: Hydra's own settings cannot be swept")
        values = self._values(o)
        if values is None:
            return None
        options = self.groups.get(o.key_or_group)
        bad = [v for v in values if v not in options] if options is not None else []
        if bad:
            raise Refused(_option_problem(o.input_line, o.key_or_group, bad[0], options))
        return f"{o.get_key_element()}={values[0]}"

    def _values(self, o: Any) -> list[str] | None:
        try:
            return list(o.sweep_string_iterator())
        except Exception:  # noqa: BLE001  (interval(...): the sweeper draws the values)
            self.unenumerable.append(o)
            return None

    def _sweeper_params(self) -> list[str]:
        """The sweeper params of the config the command line's group choices make, as overrides, less the keys the
        command line sets itself."""
        try:
            choices = self.compose(keep=lambda o: o.key_or_group in self.groups)
            params = OmegaConf.to_container(choices.hydra.sweeper, resolve=False).get("params") or {}
            given = {o.key_or_group for o in self.parsed}
            params = self.parser.parse_overrides([f"{k}={v}" for k, v in params.items() if k not in given])
        except Exception:  # noqa: BLE001  (check() says why the choices do not compose)
            return []
        lines = []
        for o in params:
            values = self._values(o) if o.is_sweep_override() else [o.input_line.split("=", 1)[1]]
            if values is not None:
                lines.append(f"{o.get_key_element()}={values[0]}")
        return lines

    def compose(self, keep: Callable[[Any], bool] = lambda o: True, preset: list[str] | None = None) -> DictConfig:
        from hydra import compose

        lines = [line for i, line in self.lines.items() if keep(self.parsed[i])]
        return compose(config_name="config", overrides=[*(preset or []), *lines], return_hydra_config=True)

    def check(self) -> None:
        from hydra.errors import ConfigCompositionException, MissingConfigException

        try:
            cfg = self.compose(preset=self.preset)
        except MissingConfigException as err:
            group, _, option = (err.missing_cfg_file or "").rpartition("/")
            culprit = _last(self.parsed, lambda o: o.key_or_group == group)
            if culprit is not None:  # else a config file's own defaults list: Hydra names the file
                raise Refused(_option_problem(culprit.input_line, group, option,
                                              err.options or self.groups.get(group, []))) from None
            return
        except ConfigCompositionException as err:
            raise Refused(self._composition_problem(err)) from None
        except Exception as err:  # noqa: BLE001  (anything else Hydra refuses: its message, on one line)
            raise Refused(_one_line(str(err)) or type(err).__name__) from None
        for o in self.unenumerable:
            if OmegaConf.select(cfg, o.key_or_group, default=_MISSING) is _MISSING:
                raise Refused(_key_problem(o.input_line, o.key_or_group, _keys(cfg), self.groups))

    def _composition_problem(self, err: Exception) -> str:
        message = str(err)
        quoted = re.search(r"'([^']*)'", message)
        key = quoted.group(1) if quoted else ""
        culprit = _last(self.parsed, lambda o: o.key_or_group == key)
        if culprit is None:
            return _one_line(message)
        line = culprit.input_line
        if message.startswith("Could not append to config"):
            return f"{line}: {key} is already in the config; to change it: {line.lstrip('+')}"
        if not message.startswith(("Could not override", "Could not delete from config")):
            return f"{line}: {_one_line(message)}"
        try:  # the keys there are without this override
            keys = _keys(self.compose(keep=lambda o: o is not culprit, preset=self.preset))
        except Exception:  # noqa: BLE001  (another override is broken too: suggest from the defaults)
            keys = _keys(self.compose(keep=lambda o: False))
        nested = getattr(err.__cause__, "full_key", None)
        if key in keys and nested:  # the key exists, a key inside its new value does not (data={a: 1}: data.a)
            inside = {k: is_node for k, is_node in keys.items() if k.startswith(f"{key}.")}
            return _key_problem(line, nested, inside, {}, with_value=False)
        return _key_problem(line, key, keys, self.groups)


def _key_problem(line: str, key: str, keys: dict[str, bool], groups: dict[str, list[str]],
                 with_value: bool = True) -> str:
    """``with_value``: the suggestions are whole overrides (``trainer.max_epochs=1``), else bare keys."""
    prefix = re.match(r"[~+]*", line).group(0) if with_value else ""
    value = line.split("=", 1)[1] if "=" in line and with_value else None
    close = _close(key, value, keys, groups)
    if not close:
        return f"{line}: no key {key} in the config (python run.py --cfg job prints them all)"
    forms = [f"{prefix}{c}" + (f"={value}" if value is not None else "") for c in close]
    return f"{line}: no key {key} in the config; did you mean {_either(forms)}?"


def _close(key: str, value: str | None, keys: dict[str, bool], groups: dict[str, list[str]]) -> list[str]:
    """The keys or groups the user most likely meant, best first: a group of that name having the value as an
    option (``modle=vittm_base`` -> ``model``); keys ending in the same name (``batch_size`` -> ``data.batch_size``,
    ``summary.batch_size``); the nearest spellings of the whole key (``trainer.max_epoch`` ->
    ``trainer.max_epochs``). A plain value is never offered to a key that holds a whole node."""
    fitting = [g for g, options in groups.items() if value in options]
    close = difflib.get_close_matches(key, fitting, n=3, cutoff=0.6)
    if close:
        return close
    node_value = value is None or value.startswith("{")
    candidates = [k for k, is_node in keys.items() if node_value or not is_node]
    candidates = list(dict.fromkeys([*candidates, *(groups if node_value else [])]))
    ratio = lambda c: difflib.SequenceMatcher(None, key, c).ratio()  # noqa: E731
    leaf = key.rpartition(".")[2]
    same_leaf = sorted((c for c in candidates if c != key and c.rpartition(".")[2] == leaf), key=ratio, reverse=True)
    if same_leaf:
        return same_leaf[:3]
    close = difflib.get_close_matches(key, candidates, n=3, cutoff=0.75)
    return [c for c in close if ratio(c) >= ratio(close[0]) - 0.05]  # only the near-best: one clear answer


def _option_problem(line: str, group: str, option: str, options: list[str]) -> str:
    close = difflib.get_close_matches(option, options, n=3, cutoff=0.6)
    if close:
        return f"{line}: {group} has no option {option}; did you mean {_either([f'{group}={c}' for c in close])}?"
    return f"{line}: {group} has no option {option}; the options: {', '.join(options)}"


def _syntax_problem(line: str, message: str) -> str:
    if "=" not in line and not line.startswith("~"):
        return f"{line}: not an override: key=value, +key=value (add a key), ~key (delete one) or group=option"
    lines = [x for x in message.splitlines() if not x.startswith(("Error parsing override", "See https://"))]
    detail = lines[0].split(" expecting {")[0] if lines else "cannot parse it"
    lexer = "LexerNoViableAltException: "
    if detail.startswith(lexer) and len(lines) > 1 and "^" in lines[1]:  # the caret marks where the lexer gave up
        detail = f"cannot read {line[max(0, lines[1].index('^') - len(lexer)):]!r}"
    return f"{line}: not a valid override ({detail}; quote values with spaces, commas or brackets; {GRAMMAR})"


def _keys(cfg: DictConfig) -> dict[str, bool]:
    """Every dotted key of the composed config, Hydra's own (``hydra.run.dir``) included, not resolved -> whether
    it holds a node (rather than a value)."""
    def walk(node: Any, prefix: str) -> Iterator[tuple[str, bool]]:
        for name, value in node.items():
            yield f"{prefix}{name}", isinstance(value, dict)
            if isinstance(value, dict):
                yield from walk(value, f"{prefix}{name}.")

    return dict(walk(OmegaConf.to_container(cfg, resolve=False), ""))


def _groups(loader: Any, parent: str) -> Iterator[str]:
    for name in loader.list_groups(parent):
        group = f"{parent}/{name}" if parent else name
        yield group
        yield from _groups(loader, group)


def _last(parsed: list, match: Callable[[Any], bool]) -> Any:
    return next((o for o in reversed(parsed) if match(o)), None)


def _either(items: list[str]) -> str:
    return items[0] if len(items) == 1 else f"{', '.join(items[:-1])} or {items[-1]}"


def _one_line(message: str) -> str:
    return "; ".join(line.strip() for line in message.splitlines() if line.strip())
