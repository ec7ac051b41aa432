"""The one exception for settings that cannot work: ``run.py`` prints its lines without a traceback, exit code 2."""


class ConfigError(ValueError):
    """A setting that cannot work; the message has one line per problem, naming the key, the value and the rule."""
