"""Errors that omnijax raises for user mistakes (as opposed to bugs)."""


class ConfigError(ValueError):
  """A configuration mistake, raised before anything is compiled.

  The message always says which field is wrong and what to change.
  """
