"""Reading a YAML config file into the option dict ``build_config`` applies: every problem
(unreadable, not UTF-8, not YAML, a key given twice, not a mapping) is one ConfigFileError
naming the file and, where YAML has one, the line."""
from __future__ import annotations

__all__ = ["ConfigFileError", "load_yaml"]


class ConfigFileError(ValueError):
    """A config file unreadable, not YAML or with a bad option: ``path``, one-line ``reason``."""

    def __init__(self, path: str, reason: str):
        super().__init__(f"config file {path}: {reason}")
        self.path, self.reason = path, reason


def _yaml_problem(err) -> str:
    """One line of a PyYAML error: where (line, column) and what."""
    mark, problem, context = (getattr(err, a, None) for a in ("problem_mark", "problem",
                                                               "context"))
    if mark is None or not problem:
        return (str(err).strip() or type(err).__name__).splitlines()[0]
    return f"line {mark.line + 1}, column {mark.column + 1}: {problem}" + (
        f" ({context})" if context else "")


def _unique_keys_loader():
    """PyYAML's safe loader, refusing a mapping that gives a key twice (PyYAML keeps the
    last silently: an option set twice in one file would take whichever came later)."""
    import yaml

    class UniqueKeys(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            first = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":    # <<: keys it may override
                    continue
                key = self.construct_object(key_node, deep=deep)
                at = (key_node.start_mark.line, key_node.start_mark.column)
                try:
                    seen = first.setdefault(key, at)
                except TypeError:               # unhashable: the base class says so
                    continue
                if seen != at:          # also within one line: {lr: 1, lr: 2}
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} again (first on line {seen[0] + 1}, "
                                    f"column {seen[1] + 1})", key_node.start_mark)
            return super().construct_mapping(node, deep)

    return UniqueKeys


def load_yaml(path: str) -> dict:
    """The option dict of a YAML config file (nested sections); else a ConfigFileError."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_unique_keys_loader())
    except OSError as err:
        raise ConfigFileError(path, (err.strerror or str(err)).lower()) from None
    except UnicodeDecodeError as err:
        raise ConfigFileError(path, f"not UTF-8 text ({err.reason})") from None
    except yaml.YAMLError as err:
        raise ConfigFileError(path, f"invalid YAML at {_yaml_problem(err)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigFileError(path, f"expected a mapping of sections, got {type(data).__name__}")
    return data
