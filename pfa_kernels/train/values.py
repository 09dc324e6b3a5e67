"""The declared type of each training config key: coerce() turns what a recipe or --set gives into that type and
checks its range, or raises ConfigError naming the key. YAML 1.1 reads 1e-3 and 5e-4 as strings (its floats need a
dot), so numbers are also accepted as text; a single value where a list is declared is a one-element list (so
`--set rule.exclude=fc` is the pattern "fc")."""

from __future__ import annotations

import math
import numbers

_NULLS = ("null", "none", "~", "")


class ConfigError(ValueError):
    """A config value, run folder or checkpoint the run cannot use; the message names the key or the file."""


class UnknownKeyError(ConfigError, KeyError):
    """A config key that does not exist (a KeyError as well, as dict lookups raise)."""

    __str__ = ConfigError.__str__  # the message itself, not KeyError's quoted repr


def _bounds_text(minimum, maximum, open_minimum=False) -> str:
    if minimum is not None and maximum is not None:
        return f" in {'(' if open_minimum else '['}{minimum}, {maximum}]"
    if minimum is not None:
        return f" {'>' if open_minimum else '>='} {minimum}"
    return f" <= {maximum}" if maximum is not None else ""


class Value:
    """A declared type: text for --help, and coerce(key, value) -> the value in that type."""

    optional = False

    def describe(self) -> str:
        raise NotImplementedError

    def convert(self, key: str, value):
        raise NotImplementedError

    def coerce(self, key: str, value):
        if self.optional and (value is None or isinstance(value, str) and value.strip().lower() in _NULLS):
            return None
        return self.convert(key, value)

    def _range_error(self, key, value):
        return ConfigError(f"{key} must be{self._bounds}{' or null' if self.optional else ''}; got {value!r}")


class Integer(Value):
    def __init__(self, minimum=None, maximum=None, optional=False):
        self.minimum, self.maximum, self.optional = minimum, maximum, optional
        self._bounds = _bounds_text(minimum, maximum)

    def describe(self) -> str:
        return f"int{self._bounds}{' or null' if self.optional else ''}"

    def convert(self, key, value):
        result = None
        if isinstance(value, numbers.Integral) and not isinstance(value, bool):
            result = int(value)
        elif isinstance(value, float) and value.is_integer():
            result = int(value)
        elif isinstance(value, str):
            try:
                result = int(value.strip())
            except ValueError:
                pass
        if result is None:
            raise ConfigError(f"{key} must be an integer; got {value!r}")
        if (self.minimum is not None and result < self.minimum) or (self.maximum is not None and result > self.maximum):
            raise self._range_error(key, result)
        return result


class Real(Value):
    def __init__(self, minimum=None, maximum=None, open_minimum=False, optional=False):
        self.minimum, self.maximum, self.open_minimum, self.optional = minimum, maximum, open_minimum, optional
        self._bounds = _bounds_text(minimum, maximum, open_minimum)

    def describe(self) -> str:
        return f"float{self._bounds}{' or null' if self.optional else ''}"

    def convert(self, key, value):
        if isinstance(value, bool) or not isinstance(value, (numbers.Real, str)):
            raise ConfigError(f"{key} must be a number; got {value!r}")
        try:
            result = float(value)
        except ValueError:
            raise ConfigError(f"{key} must be a number; got {value!r}") from None
        if not math.isfinite(result):
            raise ConfigError(f"{key} must be a finite number; got {value!r}")
        below = self.minimum is not None and (result <= self.minimum if self.open_minimum else result < self.minimum)
        if below or (self.maximum is not None and result > self.maximum):
            raise self._range_error(key, result)
        return result


class Boolean(Value):
    _WORDS = {"true": True, "yes": True, "on": True, "1": True, "false": False, "no": False, "off": False, "0": False}

    def describe(self) -> str:
        return "bool"

    def convert(self, key, value):
        if isinstance(value, bool):
            return value
        if isinstance(value, (str, int)) and str(value).strip().lower() in self._WORDS:
            return self._WORDS[str(value).strip().lower()]
        raise ConfigError(f"{key} must be true or false; got {value!r}")


class Choice(Value):
    def __init__(self, *options: str):
        self.options = options

    def describe(self) -> str:
        return " | ".join(self.options)

    def convert(self, key, value):
        if value not in self.options:
            raise ConfigError(f"{key} must be one of {', '.join(self.options)}; got {value!r}")
        return value


class Text(Value):
    """A non-empty string (a path, a name)."""

    def __init__(self, optional=False):
        self.optional = optional

    def describe(self) -> str:
        return "str or null" if self.optional else "str"

    def convert(self, key, value):
        if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)) or not str(value).strip():
            raise ConfigError(f"{key} must be a non-empty string{' or null' if self.optional else ''}; "
                              f"got {value!r}")
        return str(value)


class Many(Value):
    """A list of one declared type; a single value is a list of one."""

    def __init__(self, item: Value, item_name: str):
        self.item, self.item_name = item, item_name

    def describe(self) -> str:
        return f"list of {self.item.describe()}"

    def convert(self, key, value):
        values = value if isinstance(value, (list, tuple)) else [value]
        try:
            return [self.item.coerce(key, v) for v in values]
        except ConfigError as error:
            raise ConfigError(f"{key} must be a list of {self.item_name}; got {value!r} ({error})") from None


class Density(Value):
    """A density in (0, 1], or a pair [B density, R density]."""

    _one = Real(0, 1, open_minimum=True)

    def describe(self) -> str:
        return "float in (0, 1] or [B, R] pair"

    def convert(self, key, value):
        if isinstance(value, (list, tuple)):
            if len(value) != 2:
                raise ConfigError(f"{key} must be a density in (0, 1] or a pair [B, R]; got {value!r}")
            return [self._one.coerce(key, v) for v in value]
        return self._one.coerce(key, value)


class Device(Value):
    """auto, or anything torch.device parses (cpu, cuda, cuda:1, mps)."""

    def describe(self) -> str:
        return "auto | cpu | cuda | cuda:N"

    def convert(self, key, value):
        import torch

        if value == "auto":
            return value
        try:
            torch.device(value)
        except (RuntimeError, TypeError):
            raise ConfigError(f"{key} must be auto or a torch device (cpu, cuda, cuda:1); got {value!r}") from None
        return value


class ModelName(Value):
    """One of the built-in models, or torchvision.<name> / timm.<name> (which name exists is checked when the model is
    built: models.py)."""

    PREFIXES = ("torchvision.", "timm.")

    def __init__(self, *builtins: str):
        self.builtins = builtins

    def describe(self) -> str:
        return " | ".join(self.builtins) + " | torchvision.<name> | timm.<name>"

    def convert(self, key, value):
        if value in self.builtins:
            return value
        if isinstance(value, str) and any(value.startswith(p) and value[len(p):].strip() for p in self.PREFIXES):
            return value
        raise ConfigError(f"{key} must be one of {', '.join(self.builtins)}, torchvision.<name> (a torchvision "
                          f"classification model, e.g. torchvision.mobilenet_v3_small) or timm.<name> (needs the timm "
                          f"package); got {value!r}")


class Mapping(Value):
    """A mapping of keyword arguments (YAML: {image_size: 32}); null is an empty one."""

    def describe(self) -> str:
        return "mapping"

    def convert(self, key, value):
        if value is None:
            return {}
        if not isinstance(value, dict) or not all(isinstance(name, str) and name.isidentifier() for name in value):
            raise ConfigError(f"{key} must be a mapping of keyword arguments, e.g. {{image_size: 32}}; got {value!r}")
        return dict(value)
